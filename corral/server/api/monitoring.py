"""Monitoring reads: metric queries, metric names, a device's latest values, events, the fleet
overview. Writes come from devices (telemetry) and from the rule and alert endpoints."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from corral.core.aggregate import AGGS
from corral.core.durations import parse_duration, parse_time
from corral.errors import InvalidInput
from corral.protocol import SEVERITIES
from corral.selectors import parse
from corral.server import registry
from corral.server.api.deps import Ctx, Paging, Viewer, encode_cursor
from corral.server.api.views import iso
from corral.server.metrics_query import MetricQuery, run_query
from corral.server.store.models import (
    Alert,
    AlertInstance,
    Device,
    DeviceEvent,
    DeviceTelemetry,
    MetricName,
    Series,
    TelemetryBatch,
)
from corral.server.store.selector_sql import to_sql

router = APIRouter(tags=["monitoring"])


class QueryOut(BaseModel):
    metric: str
    agg: str
    step_s: float
    start: str | None
    end: str | None
    sources: list[str] = Field(description="resolutions read, coarse first: 1h, 1m, raw")
    series: list[dict[str, Any]] = Field(description="[{key: {...}, points: [[ts_ms, value], ...]}]")


@router.get("/metrics/query", response_model=QueryOut, summary="Aggregate a metric over time")
async def metrics_query(
    ctx: Ctx, _: Viewer,
    metric: Annotated[str, Query(min_length=1, max_length=128)],
    device: Annotated[str | None, Query(description="one device")] = None,
    selector: Annotated[str | None, Query(description="devices by selector (DESIGN §7)")] = None,
    group: Annotated[str | None, Query(description="devices of a group")] = None,
    by: Annotated[str | None, Query(description="split by 'device' or 'tag.KEY'")] = None,
    agg: Annotated[str, Query(description="avg, min, max, sum, count, p95")] = "avg",
    since: Annotated[str, Query(description="1h, an ISO time, or @epoch")] = "1h",
    until: Annotated[str | None, Query()] = None,
    step: Annotated[str | None, Query(description="bucket width, e.g. 1m; default: about 60 buckets")] = None,
) -> QueryOut:
    if agg not in AGGS:
        raise InvalidInput(f"agg must be one of {', '.join(AGGS)}")
    now = time.time()
    start = parse_time(since, now)
    end = parse_time(until, now) if until else now
    step_ms = int(parse_duration(step) * 1000) if step else None
    if selector is not None and len(selector) > ctx.config.limits.max_selector_len:
        raise InvalidInput("selector is too long")
    q = MetricQuery(metric=metric, start_ms=int(start * 1000), end_ms=int(end * 1000), agg=agg,  # type: ignore[arg-type]
                    step_ms=step_ms, device_id=device, selector=selector, group=group, by=by)
    async with ctx.reader() as db:
        r = await run_query(db, ctx.tsdb, q, ctx.config.monitoring)
    return QueryOut(metric=r.metric, agg=r.agg, step_s=r.step_ms / 1000, start=iso(r.start_ms / 1000),
                    end=iso(r.end_ms / 1000), sources=r.sources, series=r.series)


class MetricNamesOut(BaseModel):
    items: list[str]


@router.get("/metrics", response_model=MetricNamesOut, summary="Metric names reported (by a device)")
async def metric_names(ctx: Ctx, _: Viewer, device: Annotated[str | None, Query()] = None,
                       prefix: Annotated[str | None, Query(max_length=128)] = None) -> MetricNamesOut:
    stmt = select(MetricName.name).order_by(MetricName.name)
    async with ctx.reader() as db:
        if device is not None:
            await registry.get_device(db, device)
            stmt = stmt.where(MetricName.id.in_(select(Series.metric_id).where(Series.device_id == device)))
        if prefix:
            stmt = stmt.where(MetricName.name.startswith(prefix, autoescape=True))
        names = (await db.scalars(stmt.limit(10_000))).all()
    return MetricNamesOut(items=list(names))


class LatestOut(BaseModel):
    device_id: str
    metrics: dict[str, dict[str, Any]] = Field(description="name -> {ts, value}")
    dropped_batches: int = Field(description="batches the device's spool dropped when full")


@router.get("/devices/{device_id}/metrics", response_model=LatestOut, summary="A device's latest values")
async def device_latest(device_id: str, ctx: Ctx, _: Viewer) -> LatestOut:
    async with ctx.reader() as db:
        await registry.get_device(db, device_id)
        rows = await ctx.tsdb.latest(db, device_id, int(time.time() * 1000),
                                     ctx.config.monitoring.ingest.max_future_ms)
        dropped = await db.scalar(select(DeviceTelemetry.dropped).where(DeviceTelemetry.device_id == device_id))
    return LatestOut(device_id=device_id, metrics={n: {"ts": iso(ts / 1000), "value": v} for n, ts, v in rows},
                     dropped_batches=dropped or 0)


class EventOut(BaseModel):
    id: int
    device_id: str
    ts: str | None
    severity: str
    source: str
    message: str
    attrs: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = None


@router.get("/events", response_model=EventPage, summary="Device events, newest first")
async def list_events(
    ctx: Ctx, _: Viewer, paging: Paging,
    device: Annotated[str | None, Query()] = None,
    selector: Annotated[str | None, Query()] = None,
    severity: Annotated[str | None, Query(description="at least this severity")] = None,
    source: Annotated[str | None, Query(max_length=32)] = None,
    since: Annotated[str | None, Query()] = None,
) -> EventPage:
    stmt = select(DeviceEvent).order_by(DeviceEvent.id.desc())
    if severity is not None:
        if severity not in SEVERITIES:
            raise InvalidInput(f"severity must be one of {', '.join(SEVERITIES)}")
        stmt = stmt.where(DeviceEvent.severity.in_(SEVERITIES[SEVERITIES.index(severity):]))
    if source is not None:
        stmt = stmt.where(DeviceEvent.source == source)
    if since is not None:
        stmt = stmt.where(DeviceEvent.ts >= int(parse_time(since, time.time()) * 1000))
    if selector is not None:
        stmt = stmt.where(DeviceEvent.device_id.in_(select(Device.id).where(to_sql(parse(selector)))))
    if paging.cursor:
        stmt = stmt.where(DeviceEvent.id < int(paging.cursor[0]))
    async with ctx.reader() as db:
        if device is not None:
            await registry.get_device(db, device)
            stmt = stmt.where(DeviceEvent.device_id == device)
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return EventPage(items=[EventOut(id=e.id, device_id=e.device_id, ts=iso(e.ts / 1000), severity=e.severity,
                                     source=e.source, message=e.message, attrs=e.attrs or {}) for e in rows],
                     next_cursor=encode_cursor([rows[-1].id]) if more else None)


class FiringOut(BaseModel):
    alert: str
    key: str
    severity: str
    since: str | None
    value: float | None


class OverviewOut(BaseModel):
    devices: dict[str, int] = Field(description="count per admission status")
    online: int
    offline: int = Field(description="accepted devices not connected")
    agent_versions: dict[str, int]
    os_versions: dict[str, int]
    firing_alerts: list[FiringOut]
    telemetry_points_last_minute: int
    generated_at: str | None


async def _distribution(db: Any, field: str) -> dict[str, int]:
    col = Device.inventory[field].as_string()
    rows = (await db.execute(select(col, func.count()).where(Device.status == "accepted")
                             .group_by(col).order_by(func.count().desc()).limit(50))).all()
    return {(v if v is not None else "unknown"): n for v, n in rows}


@router.get("/overview", response_model=OverviewOut, summary="The fleet at a glance")
async def overview(ctx: Ctx, _: Viewer) -> OverviewOut:
    now = time.time()
    async with ctx.reader() as db:
        by_status = dict((await db.execute(select(Device.status, func.count()).group_by(Device.status))).all())
        online = await db.scalar(select(func.count()).select_from(Device)
                                 .where(Device.status == "accepted", Device.online.is_(True))) or 0
        firing = (await db.execute(
            select(Alert.name, Alert.severity, AlertInstance.key, AlertInstance.fired_at, AlertInstance.value)
            .join(AlertInstance, AlertInstance.alert_id == Alert.id).where(AlertInstance.state == "firing")
            .order_by(AlertInstance.fired_at.desc()).limit(100))).all()
        points = await db.scalar(select(func.coalesce(func.sum(TelemetryBatch.points), 0))
                                 .where(TelemetryBatch.received_at > now - 60)) or 0
        agents = await _distribution(db, "agent_version")
        oses = await _distribution(db, "os_version")
    return OverviewOut(
        devices={k: int(v) for k, v in by_status.items()}, online=int(online),
        offline=int(by_status.get("accepted", 0)) - int(online), agent_versions=agents, os_versions=oses,
        firing_alerts=[FiringOut(alert=n, key=k, severity=sev, since=iso(f), value=v) for n, sev, k, f, v in firing],
        telemetry_points_last_minute=int(points), generated_at=iso(now))
