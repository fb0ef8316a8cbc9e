"""The console's rollout, alert and webhook pages (issue 7; docs/console.md).

Every read and every change goes through the REST API's own route functions, called here
server-side with the signed-in principal (``api.rollouts.create_rollout``, ``api.alerts.patch_alert``,
``api.webhooks.test_webhook`` …), so a page validates, audits, notifies and kicks the rollout
engine exactly as the API does. Only the role check of the API's dependencies is made here
(:func:`need`), before anything is read from the form. Forms carry the page's CSRF token
(checked by :func:`console.form_principal`); the rollout page's progress is live
(:func:`corral.server.live.sse`, read by ``static/rollouts.js``).

Who may do what is the API's: rollouts and alerts are created and acted on by operators and
admins, webhooks by admins (operators read them and their delivery log; viewers see none).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, select

from corral.core.rollout_spec import parse_waves
from corral.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.selectors import parse as parse_selector
from corral.server.api import alerts as api_alerts
from corral.server.api import rollouts as api_rollouts
from corral.server.api import webhooks as api_webhooks
from corral.server.api.deps import Ctx, PageParams, decode_cursor
from corral.server.api.errors import status_for
from corral.server.auth import Principal
from corral.server.console import (
    ConsoleRoute,
    Who,
    form_principal,
    read_form,
    render,
    require_role,
    still_signed_in,
)
from corral.server.console_updates_forms import (
    ROLLOUT_FIELDS,
    Errors,
    alert_badge,
    alert_body,
    counts_text,
    done_count,
    health_gate_state,
    install_gate_state,
    instance_row,
    normalize_waves,
    rollout_body,
    segments,
    validation_errors,
    wave_preview,
    webhook_events,
)
from corral.server.context import ServerContext
from corral.server.live import sse
from corral.server.store.models import Artifact, Device, Rollout, WebhookDelivery
from corral.server.store.selector_sql import to_sql
from corral.server.updates import rollouts

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
T = TypeVar("T")

ROLLOUTS_PER_PAGE = 25
ROLLOUT_DEVICES_PER_PAGE = 50
ARTIFACTS_OFFERED = 200
ALERTS_PER_PAGE = 100
INSTANCES_SHOWN = 200
WEBHOOKS_PER_PAGE = 100
DELIVERIES_PER_PAGE = 50
DEFAULT_WAVES = "1%,10%,50%,100%"
LIVE_INTERVAL = 1.0


async def submitted(call: Callable[[], Awaitable[T]], what: str,
                    fields: Mapping[tuple[str, ...], str] | None = None,
                    field_of: Callable[[CorralError], str] = lambda e: "") -> tuple[T | None, Errors]:
    """A form's action: the API's result, or what it refused, by field (``""``: the form as a
    whole). ``call`` builds the API's body (pydantic judges it there) and calls the API."""
    try:
        return await call(), {}
    except ValidationError as e:
        errors = validation_errors(e, fields)
    except (InvalidInput, Conflict) as e:  # the API's reason: no such artifact, a name taken ...
        errors = {field_of(e): e.detail}
    errors.setdefault("", f"The {what} was not created: see the fields marked below.")
    return None, errors


def cursor_of(text: str | None) -> list[Any] | None:
    return decode_cursor(text) if text else None


Cursor = Annotated[str | None, Query(max_length=512)]


# --- rollouts: the list ---------------------------------------------------------------------------


def rollout_row(r: api_rollouts.RolloutOut) -> dict[str, Any]:
    done = sum(done_count(w.states) for w in r.waves)
    return {"r": r, "done": done, "waves": len(r.waves)}


@router.get("/rollouts")
async def rollouts_page(request: Request, ctx: Ctx, who: Who, cursor: Cursor = None) -> Response:
    page = await api_rollouts.list_rollouts(ctx, who, PageParams(ROLLOUTS_PER_PAGE, cursor_of(cursor)))
    return render(request, "rollouts.html", who, rows=[rollout_row(r) for r in page.items],
                  next_cursor=page.next_cursor, may_act=who.has_role("operator"))


# --- rollouts: the form -------------------------------------------------------------------------------


async def artifact_refs(ctx: ServerContext) -> list[dict[str, str]]:
    """The artifacts a rollout can take, newest first."""
    async with ctx.reader() as db:
        rows = (await db.execute(select(Artifact.name, Artifact.version, Artifact.kind)
                                 .order_by(Artifact.id.desc()).limit(ARTIFACTS_OFFERED))).all()
    return [{"ref": f"{n}@{v}", "kind": k} for n, v, k in rows]


def new_rollout_page(request: Request, who: Principal, artifacts: list[dict[str, str]], form: dict[str, str],
                     errors: Errors, status: int = 200) -> Response:
    return render(request, "rollout_new.html", who, status=status, artifacts=artifacts, form=form, errors=errors,
                  summary=errors.get("", ""))


FORM_DEFAULTS = {"waves": DEFAULT_WAVES, "install_gate": "on", "max_failure_rate": "20", "min_sample": "5",
                 "on_failure": "pause", "health_window": "5m", "health_tolerance": "20", "health_absolute": "0",
                 "health_min_devices": "3"}


@router.get("/rollouts/new")
async def rollout_form(request: Request, ctx: Ctx, who: Who,
                       artifact: Annotated[str, Query(max_length=140)] = "") -> Response:
    require_role(who, "operator", "creating a rollout")
    return new_rollout_page(request, who, await artifact_refs(ctx), {**FORM_DEFAULTS, "artifact": artifact}, {})


@router.post("/rollouts/new")
async def rollout_create(request: Request, ctx: Ctx, background: BackgroundTasks) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "creating a rollout")
    body, errors = rollout_body(form)
    if not errors:
        created, errors = await submitted(lambda: api_rollouts.create_rollout(
            api_rollouts.RolloutIn.model_validate(body), ctx, who, request, background), "rollout", ROLLOUT_FIELDS)
        if created is not None:
            return RedirectResponse(f"/rollouts/{created.id}", status_code=303)
    errors.setdefault("", "The rollout was not created: see the fields marked below.")
    return new_rollout_page(request, who, await artifact_refs(ctx), form, errors, status=400)


@router.get("/rollouts/new/matching")
async def matching_count(ctx: Ctx, who: Who, selector: Annotated[str, Query(max_length=4096)] = "",
                         waves: Annotated[str, Query(max_length=400)] = "") -> Response:
    """For the form, as it is typed: how many accepted devices the selector matches (the devices
    a rollout created now would take) and the waves' sizes for them."""
    out: dict[str, Any] = {"count": None, "waves": [], "error": "", "waves_error": ""}
    if selector.strip():
        try:
            if len(selector) > ctx.config.limits.max_selector_len:
                raise InvalidInput("the selector is too long")
            clause = to_sql(parse_selector(selector))
            async with ctx.reader() as db:
                out["count"] = int(await db.scalar(select(func.count()).select_from(Device).where(
                    Device.status == "accepted", clause)) or 0)
        except InvalidInput as e:
            out["error"] = e.detail
    if waves.strip():
        try:
            out["waves"] = wave_preview(waves, out["count"] or 0) if out["count"] else []
            parse_waves(normalize_waves(waves))
        except InvalidInput as e:
            out["waves_error"] = e.detail
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


# --- rollouts: one rollout, live -------------------------------------------------------------------


async def rollout_state(ctx: ServerContext, who: Principal, rollout_id: str, cursor: str | None) -> dict[str, Any]:
    """What the rollout page shows, as JSON (the live stream's events; the first render too)."""
    r = await api_rollouts.show_rollout(rollout_id, ctx, who)
    async with ctx.reader() as db:
        row = await rollouts.get(db, rollout_id)
    baseline, acknowledged = row.baseline, dict(row.acknowledged or {})
    page = await api_rollouts.rollout_devices(rollout_id, ctx, who,
                                              PageParams(ROLLOUT_DEVICES_PER_PAGE, cursor_of(cursor)))
    current = r.waves[r.current_wave - 1].states if 0 < r.current_wave <= len(r.waves) else None
    install = install_gate_state(r.spec.get("install_gate"), current, acknowledged.get(str(r.current_wave - 1)),
                                 r.reason)
    health = health_gate_state(r.spec.get("health_gate"), baseline, r.reason)
    done = sum(done_count(w.states) for w in r.waves)
    return {
        "status": r.status, "reason": r.reason, "current_wave": r.current_wave, "devices": r.devices, "done": done,
        "waves": [{"wave": w.wave, "size": w.size, "done": done_count(w.states), "text": counts_text(w.states),
                   "current": w.wave == r.current_wave and r.status in ("running", "paused"),
                   "segments": [[s.state, s.x, s.width, s.count] for s in segments(w.states, w.size)]}
                  for w in r.waves],
        "gates": {"install": [install.level, install.text], "health": [health.level, health.text]},
        "rows": [[d.device_id, d.wave, d.state, d.attempt, d.status or "", d.step or "", d.previous_version,
                  d.running_version or "", d.reason] for d in page.items],
        "next_cursor": page.next_cursor,
        # nothing will change any more: the page stops listening
        "final": r.status in ("completed", "aborted") and not any(
            w.states.get(s) for w in r.waves for s in ("active", "reverting", "scheduled", "retry")),
    }


async def rollout_page_response(request: Request, ctx: ServerContext, who: Principal, rollout_id: str,
                                cursor: str | None, error: str = "", status: int = 200) -> Response:
    r = await api_rollouts.show_rollout(rollout_id, ctx, who)
    state = await rollout_state(ctx, who, rollout_id, cursor)
    live = f"/rollouts/{r.id}/live" + (f"?cursor={quote(cursor, safe='')}" if cursor else "")
    return render(request, "rollout.html", who, status=status, r=r, s=state, cursor=cursor or "", live=live,
                  may_act=who.has_role("operator"), error=error)


@router.get("/rollouts/{rollout_id}")
async def rollout_page(request: Request, ctx: Ctx, who: Who, rollout_id: str, cursor: Cursor = None) -> Response:
    return await rollout_page_response(request, ctx, who, rollout_id[:64], cursor)


@router.get("/rollouts/{rollout_id}/live")
async def rollout_live(request: Request, ctx: Ctx, who: Who, rollout_id: str, cursor: Cursor = None) -> Response:
    rollout_id = rollout_id[:64]
    async with ctx.reader() as db:
        if await db.get(Rollout, rollout_id) is None:
            raise NotFound(f"no rollout {rollout_id!r}")

    async def snapshot() -> Any:
        return await rollout_state(ctx, who, rollout_id, cursor)

    return sse(request, snapshot, interval=LIVE_INTERVAL, allowed=still_signed_in(request, ctx))


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(request: Request, ctx: Ctx, rollout_id: str, action: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    if action not in ("pause", "resume", "abort"):
        raise NotFound(f"no action {action!r} on a rollout")
    require_role(who, "operator", f"{action[:-1] if action.endswith('e') else action}ing a rollout")
    rollout_id = rollout_id[:64]
    try:
        if action == "pause":
            await api_rollouts.pause_rollout(rollout_id, ctx, who, request)
        elif action == "resume":
            await api_rollouts.resume_rollout(rollout_id, ctx, who, request)
        else:
            await api_rollouts.abort_rollout(rollout_id, api_rollouts.AbortIn(revert=form.get("revert") == "on"),
                                             ctx, who, request)
    except CorralError as e:  # a state that does not allow it: shown on the page
        if isinstance(e, NotFound):
            raise
        return await rollout_page_response(request, ctx, who, rollout_id, None, error=e.detail,
                                           status=status_for(e))
    return RedirectResponse(f"/rollouts/{rollout_id}", status_code=303)


# --- alerts -------------------------------------------------------------------------------------------------

ALERT_DEFAULTS = {"kind": "threshold", "window": "5m", "severity": "warning", "min_severity": "error", "count": "1",
                  "enabled": "on"}


async def alerts_page_response(request: Request, ctx: ServerContext, who: Principal, cursor: str | None,
                               form: dict[str, str] | None = None, errors: Errors | None = None,
                               status: int = 200) -> Response:
    page = await api_alerts.list_alerts(ctx, who, PageParams(ALERTS_PER_PAGE, cursor_of(cursor)))
    errors = errors or {}
    return render(request, "alerts.html", who, status=status, alerts=page.items, next_cursor=page.next_cursor,
                  may_act=who.has_role("operator"), form=form or ALERT_DEFAULTS, errors=errors,
                  summary=errors.get("", ""), open_form=bool(errors))


@router.get("/alerts")
async def alerts_page(request: Request, ctx: Ctx, who: Who, cursor: Cursor = None) -> Response:
    return await alerts_page_response(request, ctx, who, cursor)


@router.post("/alerts/new")
async def alert_create(request: Request, ctx: Ctx) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "creating an alert")
    a, errors = await submitted(lambda: api_alerts.create_alert(
        api_alerts.AlertIn.model_validate(alert_body(form)), ctx, who, request), "alert",
        field_of=lambda e: "name" if isinstance(e, Conflict) else "")
    if a is not None:
        return RedirectResponse(f"/alerts/{a.id}", status_code=303)
    return await alerts_page_response(request, ctx, who, None, form, errors, status=400)


async def alert_state(ctx: ServerContext, who: Principal, ref: str) -> dict[str, Any]:
    """What an alert's page shows that changes: its state and its instances (the live stream's
    events, and the first render)."""
    a = await api_alerts.show_alert(ref, ctx, who, None, INSTANCES_SHOWN)
    instances = a.instances or []
    async with ctx.reader() as db:
        devices = set((await db.scalars(select(Device.id).where(
            Device.id.in_([i.key for i in instances if i.key])))).all())
    return {"id": a.id, "badge": alert_badge(a.enabled, a.firing),
            "rows": [instance_row(i.key, i.state, i.value, i.since, i.fired_at, i.resolved_at, i.key in devices)
                     for i in instances]}


@router.get("/alerts/{ref}")
async def alert_page(request: Request, ctx: Ctx, who: Who, ref: str) -> Response:
    a = await api_alerts.show_alert(ref[:64], ctx, who, None, 1)
    return render(request, "alert.html", who, a=a, s=await alert_state(ctx, who, a.id),
                  may_act=who.has_role("operator"))


@router.get("/alerts/{ref}/live")
async def alert_live(request: Request, ctx: Ctx, who: Who, ref: str) -> Response:
    alert_id = (await api_alerts.show_alert(ref[:64], ctx, who, None, 1)).id

    async def snapshot() -> Any:
        return await alert_state(ctx, who, alert_id)

    return sse(request, snapshot, interval=LIVE_INTERVAL, allowed=still_signed_in(request, ctx))


@router.post("/alerts/{ref}/{action}")
async def alert_action(request: Request, ctx: Ctx, ref: str, action: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    if action not in ("enable", "disable", "delete"):
        raise NotFound(f"no action {action!r} on an alert")
    require_role(who, "operator", f"{action[:-1]}ing an alert")
    if action == "delete":
        await api_alerts.delete_alert(ref[:64], ctx, who, request)
        return RedirectResponse("/alerts", status_code=303)
    a = await api_alerts.patch_alert(ref[:64], api_alerts.AlertPatch(enabled=action == "enable"), ctx, who, request)
    return RedirectResponse("/alerts" if form.get("back") == "list" else f"/alerts/{a.id}", status_code=303)


# --- webhooks -----------------------------------------------------------------------------------------------


async def webhooks_page_response(request: Request, ctx: ServerContext, who: Principal, cursor: str | None,
                                 form: dict[str, str] | None = None, errors: Errors | None = None,
                                 status: int = 200) -> Response:
    require_role(who, "operator", "reading webhooks")
    page = await api_webhooks.list_webhooks(ctx, who, PageParams(WEBHOOKS_PER_PAGE, cursor_of(cursor)))
    errors = errors or {}
    return render(request, "webhooks.html", who, status=status, hooks=page.items, next_cursor=page.next_cursor,
                  may_act=who.has_role("admin"), form=form or {"events": "alert.*"}, errors=errors,
                  summary=errors.get("", ""), open_form=bool(errors))


@router.get("/webhooks")
async def webhooks_page(request: Request, ctx: Ctx, who: Who, cursor: Cursor = None) -> Response:
    return await webhooks_page_response(request, ctx, who, cursor)


def webhook_field(e: CorralError) -> str:
    """The field a webhook's refusal is about (the API names it first: "url must ...")."""
    for field in ("url", "description"):
        if e.detail.startswith(field):
            return field
    return "events" if "event" in e.detail else ""


@router.post("/webhooks/new")
async def webhook_create(request: Request, ctx: Ctx) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "admin", "creating a webhook")
    body = {"url": form.get("url", "").strip(), "events": webhook_events(form.get("events", "")),
            "description": form.get("description", "")}
    h, errors = await submitted(lambda: api_webhooks.create_webhook(
        api_webhooks.WebhookIn.model_validate(body), ctx, who, request), "webhook", field_of=webhook_field)
    if h is not None:  # the secret is in this response only: it is never shown again
        return render(request, "webhook_created.html", who, status=201, h=h)
    return await webhooks_page_response(request, ctx, who, None, form, errors, status=400)


@router.get("/webhooks/{webhook_id}")
async def webhook_page(request: Request, ctx: Ctx, who: Who, webhook_id: str, cursor: Cursor = None) -> Response:
    require_role(who, "operator", "reading webhooks")
    h = await api_webhooks.show_webhook(webhook_id[:64], ctx, who)
    deliveries = await api_webhooks.list_deliveries(h.id, ctx, who, PageParams(DELIVERIES_PER_PAGE,
                                                                                cursor_of(cursor)), None)
    return render(request, "webhook.html", who, h=h, deliveries=deliveries.items, next_cursor=deliveries.next_cursor,
                  may_act=who.has_role("admin"))


@router.post("/webhooks/{webhook_id}/{action}")
async def webhook_action(request: Request, ctx: Ctx, webhook_id: str, action: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    if action not in ("enable", "disable", "delete", "test", "retry"):
        raise NotFound(f"no action {action!r} on a webhook")
    require_role(who, "admin", f"changing webhooks ({action})")
    webhook_id = webhook_id[:64]
    if action == "delete":
        await api_webhooks.delete_webhook(webhook_id, ctx, who, request)
        return RedirectResponse("/webhooks", status_code=303)
    if action == "test":
        await api_webhooks.test_webhook(webhook_id, ctx, who, request)
    elif action == "retry":
        delivery_id = form.get("delivery", "")[:64]
        async with ctx.reader() as db:
            d = await db.get(WebhookDelivery, delivery_id)
        if d is None or d.webhook_id != webhook_id:
            raise NotFound(f"webhook {webhook_id!r} has no delivery {delivery_id!r}")
        await api_webhooks.retry_delivery(delivery_id, ctx, who, request)
    else:
        await api_webhooks.update_webhook(webhook_id, api_webhooks.WebhookPatch(enabled=action == "enable"), ctx,
                                          who, request)
    back = "/webhooks" if form.get("back") == "list" else f"/webhooks/{webhook_id}"
    return RedirectResponse(back, status_code=303)

