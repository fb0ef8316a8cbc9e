"""The console's fleet pages (issue 7): the dashboard, groups and the audit log.

Each page calls the same functions as the REST API's routes (``api.monitoring.overview``,
``api.groups.*``, ``api.audit.*``) with the signed-in principal, after checking the role the API
route's dependency would require: a viewer is shown no mutating control, and the server refuses
the action anyway. Forms carry the page's CSRF token (checked in ``deps.principal_of``).

The dashboard is live: ``/dashboard/live`` is a server-sent event stream of the dashboard's state
(:func:`corral.server.live.sse`), which ``static/dashboard.js`` puts into the page. The state is
computed once per :data:`LIVE_INTERVAL` for all open dashboards (:class:`SharedState`), so a
hundred open tabs cost the database what one does. The pure parts (turning the API's data into
the figures shown) are :func:`distribution`, :func:`rollout_progress` and
:func:`dashboard_state`, tested in tests/unit/test_console_fleet.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from corral.core.rollout_plan import ACTIVE_STATUSES, DONE
from corral.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.selectors import Compare, Field, Str, unparse
from corral.server.api import audit as audit_api
from corral.server.api import groups as groups_api
from corral.server.api import monitoring
from corral.server.api.deps import Ctx, PageParams, decode_cursor, principal_of
from corral.server.api.errors import status_for
from corral.server.auth import Principal
from corral.server.console import ConsoleRoute, Who, device_name, form_principal, read_form, render, require_role
from corral.server.context import ServerContext
from corral.server.live import sse
from corral.server.store.models import AlertInstance, Artifact, Deployment, Rollout
from corral.server.updates.rollouts import wave_progress

#: versions shown per distribution; the rest are summed into one "others" row
VERSIONS_SHOWN = 8
ALERTS_SHOWN = 5
ROLLOUTS_SHOWN = 10
GROUPS_PER_PAGE = 100
MEMBERS_PER_PAGE = 50
#: the API's limits on what a group form may hold (GroupIn, the groups table)
MAX_DESCRIPTION = 1000
MAX_NAME = 64
AUDIT_PER_PAGE = 50
#: the longest audit detail shown in full (the API has it all)
DETAIL_CHARS = 2000
#: how often the dashboard's state is read for the live stream (seconds)
LIVE_INTERVAL = 1.0
#: how often the software versions are counted (every device's inventory is read: not every second)
SOFTWARE_INTERVAL = 10.0
#: software components shown on the dashboard (those on the most devices)
COMPONENTS_SHOWN = 6
#: the agent has its own distribution on the dashboard
AGENT_COMPONENT = "corral-agent"

Cursor = Annotated[str | None, Query(max_length=512)]

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
#: the live stream answers a missing login with a 401 (an EventSource cannot follow a login page)
live_router = APIRouter(include_in_schema=False)


# --- pure: the dashboard's figures ---------------------------------------------------------------


def version_selector(attr: str, version: str) -> str:
    """The selector of the accepted devices that report ``version`` as ``attr.<attr>`` (the
    overview counts accepted devices only)."""
    return 'status == "accepted" and ' + unparse(Compare(Field("attr", (attr,)), "==", Str(version)))


def distribution(counts: Mapping[str, int], attr: str | None, shown: int = VERSIONS_SHOWN) -> list[dict[str, Any]]:
    """Versions by device count, most first (ties by name), each with its whole percentage of the
    total and the device list's link to its devices; beyond ``shown`` they are summed into one row
    without a link (as every row when ``attr`` is None). ``unknown`` is the overview's name for
    devices that report no version."""
    total = sum(counts.values())
    ranked = sorted(((str(v), int(n)) for v, n in counts.items() if n > 0), key=lambda vn: (-vn[1], vn[0]))

    def row(label: str, n: int, href: str = "") -> dict[str, Any]:
        return {"version": label, "count": n, "percent": round(100 * n / total) if total else 0, "href": href}

    rows = [row(v, n, "" if attr is None or v == "unknown"
                else "/devices?selector=" + quote(version_selector(attr, v), safe="")) for v, n in ranked[:shown]]
    rest = ranked[shown:]
    if rest:
        rows.append(row(f"{len(rest)} other version{'s' if len(rest) != 1 else ''}", sum(n for _, n in rest)))
    return rows


def rollout_progress(rollout_id: str, artifact: str, status: str, current_wave: int,
                     waves: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A rollout's line on the dashboard: how many of its devices are done (their part is over:
    succeeded, failed, skipped or reverted), how many failed, and the wave it is in (1-based)."""
    states: dict[str, int] = {}
    for w in waves:
        for state, n in w["states"].items():
            states[state] = states.get(state, 0) + int(n)
    total = sum(states.values()) or sum(int(w["size"]) for w in waves)
    done = sum(n for s, n in states.items() if s in DONE)
    failed = states.get("failed", 0) + states.get("revert_failed", 0)
    return {"id": rollout_id, "artifact": artifact, "status": status, "wave": min(current_wave + 1, len(waves)),
            "waves": len(waves), "done": done, "total": total, "failed": failed,
            "succeeded": states.get("succeeded", 0), "percent": (100 * done // total) if total else 0}


def iso_text(stamp: str | None) -> str:
    """An API time (ISO 8601 in UTC, ``...Z``) for people: to the second, as the other pages show it."""
    return f"{stamp[:19].replace('T', ' ')} UTC" if stamp else ""


def software_distributions(counts: Mapping[str, Mapping[str, int]],
                           shown: int = COMPONENTS_SHOWN) -> list[dict[str, Any]]:
    """The software the devices run (their inventory's ``software``: ``app.NAME``, ``rootfs`` ...),
    the components on the most devices first, each with its versions as :func:`distribution`
    ranks them. The agent is left out (it has its own table), and versions link nowhere: a
    component's name holds a dot, which a selector's ``attr.`` path cannot say."""
    ranked = sorted(((c, v) for c, v in counts.items() if c != AGENT_COMPONENT and sum(v.values()) > 0),
                    key=lambda cv: (-sum(cv[1].values()), cv[0]))
    return [{"component": c, "versions": distribution(v, None)} for c, v in ranked[:shown]]


def dashboard_state(overview: monitoring.OverviewOut, firing: int,
                    rollouts: Sequence[dict[str, Any]], software: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """What the dashboard shows, as JSON: the page renders it, and the live stream sends it when it
    changes (so nothing in it may change by itself, like the time it was made)."""
    return {
        "online": overview.online,
        "offline": overview.offline,
        "pending": overview.devices.get("pending", 0),
        "accepted": overview.devices.get("accepted", 0),
        "points_per_minute": overview.telemetry_points_last_minute,
        "agent_versions": distribution(overview.agent_versions, "agent_version"),
        "os_versions": distribution(overview.os_versions, "os_version"),
        "firing": firing,
        "alerts": [{"alert": a.alert, "key": a.key, "severity": a.severity, "since": a.since or "",
                    "since_text": iso_text(a.since)} for a in overview.firing_alerts[:ALERTS_SHOWN]],
        "rollouts": list(rollouts),
        "software": list(software),
    }


# --- the dashboard -------------------------------------------------------------------------------


async def active_rollouts(ctx: ServerContext) -> list[dict[str, Any]]:
    """Running and paused rollouts, newest first, with their progress."""
    stmt = (select(Rollout, Artifact.name, Artifact.version)
            .outerjoin(Deployment, Deployment.id == Rollout.deployment_id)
            .outerjoin(Artifact, Artifact.id == Deployment.artifact_id)
            .where(Rollout.status.in_(sorted(ACTIVE_STATUSES)))
            .order_by(Rollout.created_at.desc(), Rollout.id.desc()).limit(ROLLOUTS_SHOWN))
    out = []
    async with ctx.reader() as db:
        for r, name, version in (await db.execute(stmt)).all():
            waves = await wave_progress(db, r)
            out.append(rollout_progress(r.id, f"{name}@{version}" if name else "", r.status, r.current_wave, waves))
    return out


#: per (component, version), the accepted devices whose inventory's ``software`` says so; the
#: value guarded to an object first (PostgreSQL's json_each_text refuses anything else)
SOFTWARE_SQL = {
    "postgresql": text(
        "SELECT s.key, s.value, count(*) FROM devices, jsonb_each_text(CASE WHEN "
        "jsonb_typeof(devices.inventory::jsonb -> 'software') = 'object' THEN devices.inventory::jsonb -> 'software' "
        "ELSE '{}'::jsonb END) AS s WHERE devices.status = 'accepted' GROUP BY s.key, s.value"),
    "sqlite": text(
        "SELECT s.key, s.value, count(*) FROM devices, json_each(CASE WHEN "
        "json_type(devices.inventory, '$.software') = 'object' THEN json_extract(devices.inventory, '$.software') "
        "ELSE '{}' END) AS s WHERE devices.status = 'accepted' GROUP BY s.key, s.value"),
}


async def software_versions(db: AsyncSession) -> dict[str, dict[str, int]]:
    """Per software component, the accepted devices per version it reports."""
    out: dict[str, dict[str, int]] = {}
    for component, version, n in (await db.execute(SOFTWARE_SQL[db.get_bind().dialect.name])).all():
        if version is not None:
            versions = out.setdefault(str(component), {})
            versions[str(version)] = versions.get(str(version), 0) + int(n)
    return out


async def read_software(ctx: ServerContext) -> list[dict[str, Any]]:
    async with ctx.reader() as db:
        return software_distributions(await software_versions(db))


async def read_dashboard(ctx: ServerContext, who: Principal, software: SharedState) -> dict[str, Any]:
    overview = await monitoring.overview(ctx, who)
    async with ctx.reader() as db:  # the overview lists at most 100 firing alerts: the count is exact
        firing = await db.scalar(select(func.count()).select_from(AlertInstance)
                                 .where(AlertInstance.state == "firing")) or 0
    return dashboard_state(overview, int(firing), await active_rollouts(ctx),
                           await software.get(lambda: read_software(ctx)))


class SharedState:
    """A value read at most once per ``ttl`` seconds however many streams ask for it."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._value: Any = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self, read: Callable[[], Awaitable[Any]]) -> Any:
        async with self._lock:
            if time.monotonic() >= self._expires:
                self._value = await read()
                self._expires = time.monotonic() + self._ttl
            return self._value


def shared(request: Request, name: str, ttl: float) -> SharedState:
    """The app's one shared state of that name (every role sees the same dashboard)."""
    state = getattr(request.app.state, name, None)
    if state is None:
        state = SharedState(ttl)
        setattr(request.app.state, name, state)
    return state


def shared_dashboard(request: Request, ctx: ServerContext, who: Principal) -> Callable[[], Awaitable[Any]]:
    """The dashboard's state, read at most once per interval for all open dashboards (the software
    versions at most once per :data:`SOFTWARE_INTERVAL`)."""
    state = shared(request, "console_dashboard", LIVE_INTERVAL * 0.9)
    software = shared(request, "console_software", SOFTWARE_INTERVAL)
    return lambda: state.get(lambda: read_dashboard(ctx, who, software))


@router.get("/")
async def dashboard_page(request: Request, ctx: Ctx, who: Who) -> Response:
    state = await shared_dashboard(request, ctx, who)()
    return render(request, "dashboard.html", who, state=state)


@live_router.get("/dashboard/live")
async def dashboard_live(request: Request, ctx: Ctx) -> Response:
    """The dashboard's state as server-sent events: at once, then whenever it changes. A session
    that ends (logged out, expired) gets ``{"signed_out": true}`` and nothing more."""
    who = await principal_of(request, ctx)
    read = shared_dashboard(request, ctx, who)

    async def snapshot() -> Any:
        try:
            await principal_of(request, ctx)
        except CorralError:
            return {"signed_out": True}
        return await read()

    response = sse(request, snapshot, LIVE_INTERVAL)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# --- groups --------------------------------------------------------------------------------------


def group_form(form: Mapping[str, str]) -> tuple[str, str | None, str]:
    """The new-group form as (name, selector or None for a static group, description)."""
    name = form.get("name", "").strip()
    description = form.get("description", "").strip()
    if len(description) > MAX_DESCRIPTION:
        raise InvalidInput(f"the description is longer than {MAX_DESCRIPTION} characters")
    if form.get("kind", "static") == "dynamic":
        selector = form.get("selector", "").strip()
        if not selector:
            raise InvalidInput("a dynamic group needs a selector, e.g. tag.site == \"berlin\"")
        return name, selector, description
    return name, None, description


def device_ids(text: str) -> list[str]:
    """Device ids typed into a form, separated by spaces, commas or new lines (duplicates dropped)."""
    ids = list(dict.fromkeys(x for x in re.split(r"[\s,]+", text) if x))
    if not ids:
        raise InvalidInput("enter the ids of the devices to add, separated by spaces or commas")
    return ids


def paging(cursor: str | None, per_page: int) -> PageParams:
    return PageParams(per_page, decode_cursor(cursor) if cursor else None)


async def groups_response(request: Request, ctx: ServerContext, who: Principal, cursor: str | None = None,
                          form: Mapping[str, str] | None = None, error: str = "", status: int = 200) -> Response:
    page = await groups_api.list_groups(ctx, who, paging(cursor, GROUPS_PER_PAGE))
    return render(request, "groups.html", who, status=status, groups=page.items, next_cursor=page.next_cursor,
                  form=dict(form or {}), error=error, may_edit=who.has_role("operator"))


@router.get("/groups")
async def groups_page(request: Request, ctx: Ctx, who: Who, cursor: Cursor = None) -> Response:
    return await groups_response(request, ctx, who, cursor)


@router.post("/groups")
async def create_group(request: Request, ctx: Ctx) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "creating a group")
    try:
        name, selector, description = group_form(form)
        await groups_api.create_group(groups_api.GroupIn(name=name, selector=selector, description=description),
                                      ctx, who, request)
    except (InvalidInput, Conflict) as e:  # shown above the form, which keeps what was typed
        return await groups_response(request, ctx, who, form=form, error=e.detail, status=status_for(e))
    return RedirectResponse(f"/groups/{quote(name, safe='')}", status_code=303)


async def group_response(request: Request, ctx: ServerContext, who: Principal, name: str, cursor: str | None = None,
                         typed: str = "", error: str = "", status: int = 200) -> Response:
    group = await groups_api.show_group(name, ctx, who)
    members = await groups_api.group_devices(name, ctx, who, paging(cursor, MEMBERS_PER_PAGE), "id")
    rows = [{"device": d, "name": device_name(d)} for d in members.items]
    return render(request, "group.html", who, status=status, group=group, rows=rows,
                  next_cursor=members.next_cursor, typed=typed, error=error, may_edit=who.has_role("operator"))


@router.get("/groups/{name}")
async def group_page(request: Request, ctx: Ctx, who: Who, name: str, cursor: Cursor = None) -> Response:
    return await group_response(request, ctx, who, name[:MAX_NAME], cursor)


@router.post("/groups/{name}/members")
async def add_members(request: Request, ctx: Ctx, name: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "adding devices to a group")
    name = name[:MAX_NAME]
    typed = form.get("device_ids", "")
    try:
        ids = device_ids(typed)
        await groups_api.add_members(name, groups_api.MembersIn(device_ids=ids), ctx, who, request)
    except (InvalidInput, Conflict) as e:
        return await group_response(request, ctx, who, name, typed=typed, error=e.detail, status=status_for(e))
    except NotFound as e:
        if not e.detail.startswith("no group"):  # a device that does not exist: said beside the form
            return await group_response(request, ctx, who, name, typed=typed, error=e.detail, status=404)
        raise
    return RedirectResponse(f"/groups/{quote(name, safe='')}", status_code=303)


@router.post("/groups/{name}/members/{device_id}/remove")
async def remove_member(request: Request, ctx: Ctx, name: str, device_id: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "removing devices from a group")
    name = name[:MAX_NAME]
    try:
        await groups_api.remove_member(name, device_id[:64], ctx, who, request)
    except Conflict as e:
        return await group_response(request, ctx, who, name, error=e.detail, status=409)
    return RedirectResponse(f"/groups/{quote(name, safe='')}", status_code=303)


@router.post("/groups/{name}/delete")
async def delete_group(request: Request, ctx: Ctx, name: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "deleting a group")
    await groups_api.delete_group(name[:MAX_NAME], ctx, who, request)
    return RedirectResponse("/groups", status_code=303)


# --- the audit log -------------------------------------------------------------------------------


def detail_text(detail: Mapping[str, Any], limit: int = DETAIL_CHARS) -> str:
    """An entry's detail as one line of JSON (keys sorted), cut at ``limit`` characters."""
    text = json.dumps(detail, sort_keys=True, ensure_ascii=False, separators=(", ", ": "), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def verify_message(r: audit_api.VerifyOut) -> str:
    if r.ok:
        return f"The hash chain is intact: {r.entries} entr{'y' if r.entries == 1 else 'ies'} verified."
    return f"The hash chain is broken after {r.entries} good entries: {r.problem}."


AuditFilter = Annotated[str, Query(max_length=256)]


@router.get("/audit")
async def audit_page(request: Request, ctx: Ctx, who: Who, actor: AuditFilter = "", action: AuditFilter = "",
                     target: AuditFilter = "", cursor: Cursor = None, verify: bool = False) -> Response:
    verified = None
    if verify:
        require_role(who, "admin", "verifying the audit log")
        verified = await audit_api.verify_audit(ctx, who)
    params = paging(cursor, AUDIT_PER_PAGE)
    if params.cursor is not None and not (params.cursor and isinstance(params.cursor[0], int)):
        raise InvalidInput("cursor is not valid: pass next_cursor from the previous page")
    page = await audit_api.list_audit(ctx, who, params, action.strip() or None, actor.strip() or None,
                                      target.strip() or None)
    entries = [{"entry": e, "detail": detail_text(e.detail)} for e in page.items]
    return render(request, "audit.html", who, entries=entries, next_cursor=page.next_cursor,
                  filters={"actor": actor, "action": action, "target": target},
                  verified=verified, verify_text=verify_message(verified) if verified else "",
                  may_verify=who.role == "admin")


router.include_router(live_router)  # keeps its own route class: a plain 401 for a stream without a login
