"""Server-side alerts: create, list, show (with instances), enable/disable, delete.

Kinds (see :mod:`corral.server.alerts`): ``threshold`` (``expr`` over aggregates such as
``avg(cpu.percent) > 80 for 5m``, optionally per ``by`` tag), ``offline`` (a device offline
longer than ``for``), ``event_rate`` (``count`` events at or above ``min_severity`` within
``window``). Notifications go to webhooks subscribed to ``alert.firing`` / ``alert.resolved``.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.core.durations import parse_duration
from corral.errors import Conflict, InvalidInput, NotFound
from corral.protocol import SEVERITIES
from corral.selectors import parse
from corral.server.alerts import parse_threshold
from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.views import iso
from corral.server.store.models import Alert, AlertInstance

router = APIRouter(tags=["alerts"])

Severity = Literal["debug", "info", "warning", "error", "critical"]


class AlertIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["threshold", "offline", "event_rate"]
    selector: str = Field(default="", description="devices in scope; empty: all accepted devices")
    expr: str = Field(default="", max_length=1000, description="threshold: e.g. 'avg(cpu.percent) > 80 for 5m'")
    by: str | None = Field(default=None, description="one instance per value of this tag: tag.KEY")
    for_: str | None = Field(default=None, alias="for", description="offline: how long offline, e.g. 10m")
    window: str = Field(default="5m", description="threshold and event_rate: the lookback window")
    severity: Severity = "warning"
    min_severity: Severity = Field(default="error", description="event_rate: count events at least this severe")
    source: str | None = Field(default=None, max_length=32, description="event_rate: only events from this source")
    count: int = Field(default=1, ge=1, le=1_000_000, description="event_rate: fire at this many events")
    enabled: bool = True

    model_config = {"populate_by_name": True}


class AlertPatch(BaseModel):
    enabled: bool | None = None


class InstanceOut(BaseModel):
    key: str
    state: str
    since: str | None
    value: float | None
    fired_at: str | None
    resolved_at: str | None


class AlertOut(BaseModel):
    id: str
    name: str
    kind: str
    selector: str
    expr: str
    by: str | None
    for_s: float
    window_s: float
    severity: str
    params: dict[str, Any]
    enabled: bool
    created_at: str | None
    created_by: str
    firing: int = 0
    instances: list[InstanceOut] | None = None


class AlertPage(BaseModel):
    items: list[AlertOut]
    next_cursor: str | None = None


def _view(a: Alert, firing: int) -> AlertOut:
    return AlertOut(id=a.id, name=a.name, kind=a.kind, selector=a.selector, expr=a.expr,
                    by=f"tag.{a.by_tag}" if a.by_tag else None, for_s=a.for_s, window_s=a.window_s,
                    severity=a.severity, params=a.params or {}, enabled=a.enabled, created_at=iso(a.created_at),
                    created_by=a.created_by, firing=firing)


async def _firing(db: AsyncSession, ids: list[str]) -> dict[str, int]:
    rows = (await db.execute(select(AlertInstance.alert_id, func.count()).where(
        AlertInstance.alert_id.in_(ids), AlertInstance.state == "firing").group_by(AlertInstance.alert_id))).all()
    return {a: int(n) for a, n in rows}


async def _get(db: AsyncSession, ref: str) -> Alert:
    a = await db.get(Alert, ref) or await db.scalar(select(Alert).where(Alert.name == ref))
    if a is None:
        raise NotFound(f"no alert {ref!r}")
    return a


def _checked(body: AlertIn, max_selector: int) -> dict[str, Any]:
    """The row's fields from the request, every part validated before anything is written."""
    if body.selector:
        if len(body.selector) > max_selector:
            raise InvalidInput("selector is too long")
        parse(body.selector)
    by_tag = None
    if body.by is not None:
        if body.kind == "offline":
            raise InvalidInput("by is for threshold and event_rate alerts (offline alerts are per device)")
        if not body.by.startswith("tag.") or len(body.by) <= 4 or len(body.by) > 68:
            raise InvalidInput("by must be tag.KEY")
        by_tag = body.by[4:]
    window_s = parse_duration(body.window)
    if window_s > 7 * 86400:
        raise InvalidInput("window must be at most 7d")
    fields: dict[str, Any] = {"by_tag": by_tag, "window_s": window_s, "expr": "", "for_s": 0.0, "params": {}}
    if body.kind == "threshold":
        if not body.expr.strip():
            raise InvalidInput("a threshold alert needs expr, e.g. 'avg(cpu.percent) > 80 for 5m'")
        cond = parse_threshold(body.expr)
        fields |= {"expr": body.expr.strip(), "for_s": cond.for_s}
    elif body.expr:
        raise InvalidInput("expr is for threshold alerts")
    if body.kind == "offline":
        if not body.for_:
            raise InvalidInput("an offline alert needs for, e.g. 10m")
        fields["for_s"] = parse_duration(body.for_)
    elif body.for_:
        raise InvalidInput("for is for offline alerts; a threshold alert says 'for' inside expr")
    if body.kind == "event_rate":
        if body.min_severity not in SEVERITIES:
            raise InvalidInput("min_severity is not a severity")
        fields["params"] = {"min_severity": body.min_severity, "count": body.count,
                            **({"source": body.source} if body.source else {})}
    return fields


@router.post("/alerts", response_model=AlertOut, status_code=201, summary="Create an alert")
async def create_alert(body: AlertIn, ctx: Ctx, who: Operator, request: Request) -> AlertOut:
    fields = _checked(body, ctx.config.limits.max_selector_len)
    now = time.time()
    async with ctx.writer() as db:
        if await db.scalar(select(Alert.id).where(Alert.name == body.name)) is not None:
            raise Conflict(f"alert {body.name!r} already exists")
        a = Alert(id=secrets.token_hex(6), name=body.name, kind=body.kind, selector=body.selector.strip(),
                  severity=body.severity, enabled=body.enabled, created_at=now, updated_at=now,
                  created_by=who.name, **fields)
        db.add(a)
        await ctx.audit(db, who, "alert.create", body.name,
                        {"id": a.id, "kind": a.kind, "selector": a.selector, "expr": a.expr}, rid(request))
    return _view(a, 0)


@router.get("/alerts", response_model=AlertPage, summary="List alerts with their firing counts")
async def list_alerts(ctx: Ctx, _: Viewer, paging: Paging) -> AlertPage:
    stmt = select(Alert).order_by(Alert.name)
    if paging.cursor:
        stmt = stmt.where(Alert.name > str(paging.cursor[0]))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
        more = len(rows) > paging.limit
        rows = rows[: paging.limit]
        firing = await _firing(db, [a.id for a in rows])
    return AlertPage(items=[_view(a, firing.get(a.id, 0)) for a in rows],
                     next_cursor=encode_cursor([rows[-1].name]) if more else None)


@router.get("/alerts/{ref}", response_model=AlertOut, summary="Show an alert and its instances")
async def show_alert(ref: str, ctx: Ctx, _: Viewer,
                     state: Annotated[str | None, Query(description="only instances in this state")] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AlertOut:
    async with ctx.reader() as db:
        a = await _get(db, ref)
        stmt = select(AlertInstance).where(AlertInstance.alert_id == a.id)
        if state is not None:
            stmt = stmt.where(AlertInstance.state == state)
        rows = (await db.scalars(stmt.order_by(AlertInstance.updated_at.desc()).limit(limit))).all()
        firing = await _firing(db, [a.id])
    out = _view(a, firing.get(a.id, 0))
    out.instances = [InstanceOut(key=r.key, state=r.state, since=iso(r.since), value=r.value,
                                 fired_at=iso(r.fired_at), resolved_at=iso(r.resolved_at)) for r in rows]
    return out


@router.patch("/alerts/{ref}", response_model=AlertOut, summary="Enable or disable an alert")
async def patch_alert(ref: str, body: AlertPatch, ctx: Ctx, who: Operator, request: Request) -> AlertOut:
    async with ctx.writer() as db:
        a = await _get(db, ref)
        if body.enabled is not None and body.enabled != a.enabled:
            a.enabled = body.enabled
            a.updated_at = time.time()
            await ctx.audit(db, who, "alert.enable" if body.enabled else "alert.disable", a.name, {"id": a.id},
                            rid(request))
        firing = await _firing(db, [a.id])
        return _view(a, firing.get(a.id, 0))


@router.delete("/alerts/{ref}", status_code=204, summary="Delete an alert and its instances")
async def delete_alert(ref: str, ctx: Ctx, who: Operator, request: Request) -> Response:
    async with ctx.writer() as db:
        a = await _get(db, ref)
        await db.delete(a)
        await ctx.audit(db, who, "alert.delete", a.name, {"id": a.id}, rid(request))
    return Response(status_code=204)
