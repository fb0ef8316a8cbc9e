"""Server-side alerts: evaluate every alert on a schedule, move its instances, notify (DESIGN §6).

Each evaluation turns an alert into observations per *instance key* and steps each instance's
state machine (:mod:`corral.core.alerting`):

``threshold``
    ``expr`` over aggregates, e.g. ``avg(cpu.percent) > 80 for 5m``: every ``avg(...)`` is the
    aggregate over the raw points of the last ``window_s`` of the devices the selector picks,
    per value of ``by_tag`` (one instance per site, say) or once (key ``""``). No data is
    ``unknown``: it neither fires nor resolves an alert.
``offline``
    one instance per device in scope: ``true`` once an accepted device has been offline longer
    than ``for_s`` (so it has no extra hold time), ``false`` when it is back.
``event_rate``
    events at or above ``params.min_severity`` (and from ``params.source``, if given) in the
    last ``window_s``, per ``by_tag`` value: ``true`` at ``params.count`` or more.

A state change and its webhook notification (``alert.firing`` / ``alert.resolved``) are
written in the same transaction (the outbox pattern), so a notification exists exactly when
the change was committed. With several replicas only one evaluates at a time (a PostgreSQL
advisory lock); a replica that loses the race skips the round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from corral.core import alerting, expr
from corral.core.aggregate import percentile
from corral.errors import InvalidInput
from corral.protocol import SEVERITIES
from corral.selectors import parse
from corral.server import webhooks
from corral.server.context import ServerContext
from corral.server.store.models import (
    Alert,
    AlertInstance,
    Device,
    DeviceEvent,
    DeviceTag,
    MetricName,
    Point,
    Series,
)
from corral.server.store.selector_sql import to_sql
from corral.server.tsdb import minute_condition, series_in

log = logging.getLogger(__name__)

KINDS = ("threshold", "offline", "event_rate")
Observations = dict[str, tuple[alerting.Observation, float | None]]


def parse_threshold(text_: str) -> expr.Condition:
    """An alert condition: aggregates only -- a bare metric has no single value over a fleet."""
    cond = expr.parse_condition(text_, functions=expr.AGGREGATES)
    if expr.metrics_used(cond.node):
        bare = sorted(expr.metrics_used(cond.node))[0]
        raise InvalidInput(f"use an aggregate over the devices, e.g. avg({bare}), not the bare metric {bare}")
    return cond


def _scope(selector: str) -> Any:
    return to_sql(parse(selector)) if selector else None


def _device_filter(col: Any, selector: str) -> list[Any]:
    conds = [col.in_(select(Device.id).where(Device.status == "accepted"))]
    scope = _scope(selector)
    if scope is not None:
        conds.append(col.in_(select(Device.id).where(scope)))
    return conds


async def _aggregates(db: AsyncSession, alert: Alert, calls: frozenset[tuple[str, str]],
                      now: float) -> dict[str, dict[tuple[str, str], float | None]]:
    """key -> (func, metric) -> value over the window."""
    start_ms, end_ms = int((now - alert.window_s) * 1000), int(now * 1000)
    postgres = db.get_bind().dialect.name == "postgresql"
    out: dict[str, dict[tuple[str, str], float | None]] = {}
    for fn, metric in sorted(calls):
        mid = await db.scalar(select(MetricName.id).where(MetricName.name == metric))
        if mid is None:
            continue
        key = DeviceTag.value if alert.by_tag else literal("")
        j = Point.__table__.join(Series.__table__, Series.id == Point.series_id)
        if alert.by_tag:
            j = j.outerjoin(DeviceTag.__table__, and_(DeviceTag.device_id == Series.device_id,
                                                      DeviceTag.key == alert.by_tag))
        which = [Series.metric_id == mid, *_device_filter(Series.device_id, alert.selector)]
        conds = [series_in(Point.series_id, which, postgres), Point.ts >= start_ms, Point.ts <= end_ms,
                 minute_condition(Point.minute, start_ms, end_ms + 1)]
        if fn == "p95":
            rows = (await db.execute(select(key, Point.value).select_from(j).where(*conds))).all()
            values: dict[str, list[float]] = {}
            for k, v in rows:
                values.setdefault(k or "", []).append(v)
            for k, vs in values.items():
                out.setdefault(k, {})[(fn, metric)] = percentile(vs, 0.95)
            continue
        aggs: dict[str, Any] = {"avg": func.avg, "min": func.min, "max": func.max, "sum": func.sum,
                                "count": func.count}
        rows = (await db.execute(select(key, aggs[fn](Point.value)).select_from(j).where(*conds).group_by(key))).all()
        for k, v in rows:
            out.setdefault(k or "", {})[(fn, metric)] = float(v) if v is not None else None
    return out


async def observe_threshold(db: AsyncSession, alert: Alert, now: float, known: Sequence[str]) -> Observations:
    cond = parse_threshold(alert.expr)
    calls = expr.calls_used(cond.node)
    values = await _aggregates(db, alert, calls, now)
    obs: Observations = {}
    for key in set(values) | set(known) | ({""} if not alert.by_tag else set()):
        vals = values.get(key, {})

        def lookup(ref: expr.Ref, vals: dict[tuple[str, str], float | None] = vals) -> float | None:
            return vals.get((ref.func, ref.metric)) if isinstance(ref, expr.Call) else None

        result = expr.evaluate(cond.node, lookup)
        first = next(iter(sorted(calls)), None)
        obs[key] = (alerting.as_observation(result), vals.get(first) if first else None)
    return obs


async def observe_offline(db: AsyncSession, alert: Alert, now: float, known: Sequence[str]) -> Observations:
    cut = now - alert.for_s
    offline = set((await db.scalars(
        select(Device.id).where(Device.online.is_(False), Device.last_seen.is_not(None), Device.last_seen < cut,
                                *_device_filter(Device.id, alert.selector)))).all())
    obs: Observations = {d: ("true", None) for d in offline}
    for d in known:
        if d not in offline:
            obs[d] = ("false", None)
    return obs


async def observe_event_rate(db: AsyncSession, alert: Alert, now: float, known: Sequence[str]) -> Observations:
    params = alert.params or {}
    min_sev = params.get("min_severity", "error")
    threshold = int(params.get("count", 1))
    key = DeviceTag.value if alert.by_tag else literal("")
    j = DeviceEvent.__table__
    if alert.by_tag:
        j = j.outerjoin(DeviceTag.__table__, and_(DeviceTag.device_id == DeviceEvent.device_id,
                                                  DeviceTag.key == alert.by_tag))
    conds = [DeviceEvent.ts >= int((now - alert.window_s) * 1000),
             DeviceEvent.severity.in_(SEVERITIES[SEVERITIES.index(min_sev):]),
             *_device_filter(DeviceEvent.device_id, alert.selector)]
    if params.get("source"):
        conds.append(DeviceEvent.source == params["source"])
    rows = (await db.execute(select(key, func.count()).select_from(j).where(*conds).group_by(key))).all()
    counts = {(k or ""): int(n) for k, n in rows}
    obs: Observations = {}
    for k in set(counts) | set(known) | ({""} if not alert.by_tag else set()):
        n = counts.get(k, 0)
        obs[k] = (alerting.event_rate_observation(n, threshold), float(n))
    return obs


OBSERVERS = {"threshold": observe_threshold, "offline": observe_offline, "event_rate": observe_event_rate}


def _instance_state(row: AlertInstance | None) -> alerting.InstanceState:
    if row is None:
        return alerting.InstanceState()
    return alerting.InstanceState(state=row.state, since=row.since, fired_at=row.fired_at,  # type: ignore[arg-type]
                                  value=row.value)


def notification_data(alert: Alert, key: str, n: alerting.Notification) -> dict[str, Any]:
    return {"alert": {"id": alert.id, "name": alert.name, "kind": alert.kind, "severity": alert.severity,
                      "selector": alert.selector, "expr": alert.expr, "by_tag": alert.by_tag},
            "key": key, "state": n.kind, "value": n.value,
            "fired_at": webhooks.iso_utc(n.fired_at) if n.fired_at else None,
            "at": webhooks.iso_utc(n.at)}


async def observe(db: AsyncSession, alert: Alert, now: float) -> Observations:
    """What an alert's condition says now, per instance key (reads only)."""
    known = list((await db.scalars(select(AlertInstance.key).where(
        AlertInstance.alert_id == alert.id, AlertInstance.state != "inactive"))).all())
    return await OBSERVERS[alert.kind](db, alert, now, known)


async def apply_observations(db: AsyncSession, alert: Alert, obs: Observations, now: float) -> list[tuple[str, str]]:
    """Step every instance of ``alert`` inside the caller's write transaction, writing a
    webhook message for each notification; returns them as (key, kind)."""
    rows = {r.key: r for r in (await db.scalars(select(AlertInstance).where(AlertInstance.alert_id == alert.id)))}
    hold = 0.0 if alert.kind == "offline" else alert.for_s
    sent: list[tuple[str, str]] = []
    for key, (observation, value) in obs.items():
        row = rows.get(key)
        before = _instance_state(row)
        after, note = alerting.step(before, observation, now, hold, value=value)
        if row is None:
            if after.state == "inactive":
                continue  # nothing to remember: most devices never trip an alert
            row = AlertInstance(alert_id=alert.id, key=key, state=after.state, since=after.since or now,
                                value=after.value, fired_at=after.fired_at, resolved_at=None, updated_at=now)
            db.add(row)
        elif after != before:
            row.state, row.since, row.value, row.fired_at = after.state, after.since or now, after.value, after.fired_at
            row.updated_at = now
        if note is not None:
            if note.kind == "resolved":
                row.resolved_at = now
            await webhooks.enqueue(db, f"alert.{note.kind}", notification_data(alert, key, note), now)
            sent.append((key, note.kind))
    return sent


async def evaluate_all(ctx: ServerContext, now: float | None = None) -> dict[str, list[tuple[str, str]]]:
    """One round: observe every enabled alert with a read-only session (the aggregates may scan
    many points, and SQLite's single writer must not wait for that), then apply the steps in one
    short write transaction."""
    now = time.time() if now is None else now
    observed: list[tuple[Alert, Observations]] = []
    async with ctx.reader() as db:
        alerts = (await db.scalars(select(Alert).where(Alert.enabled.is_(True)).order_by(Alert.name))).all()
        for alert in alerts:
            try:
                observed.append((alert, await observe(db, alert, now)))
            except Exception:  # one broken alert must not stop the others
                log.exception("evaluating alert %s failed", alert.name)
    out: dict[str, list[tuple[str, str]]] = {}
    if not observed:
        return out
    async with ctx.writer() as db:
        if not ctx.sqlite:
            got = await db.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext('corral.alerts'))"))
            if not got:  # another replica is applying this round
                return out
        for alert, obs in observed:
            if await db.get(Alert, alert.id) is None:
                continue  # deleted meanwhile
            out[alert.name] = await apply_observations(db, alert, obs, now)
    if any(out.values()):
        webhooks.notify(ctx)
        log.info("alerts: %s", {k: v for k, v in out.items() if v})
    return out
