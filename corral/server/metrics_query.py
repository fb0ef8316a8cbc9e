"""Reading time series: per device, or aggregated over a selector or group, split by a key.

The plan (which resolution for which part of the range) is :mod:`corral.core.aggregate`; this
module turns each segment into one SQL ``GROUP BY (key, bucket)`` -- the database does the
counting, Python merges the segments -- and, for ``p95``, fetches the bucket's values instead
(bounded by ``max_query_rows``). The device set is a subquery (``series.device_id IN (...)``) on
the same selector push-down as device listing, so a query over a site of 5,000 devices walks
the metric's series and, for each, one index search per minute of raw points
(:func:`~corral.server.tsdb.minute_condition`) or one index range of rollups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.core.aggregate import Acc, Agg, align_start, percentile, pick_step, plan_segments
from corral.errors import InvalidInput, NotFound
from corral.selectors import parse
from corral.server import registry
from corral.server.config import Monitoring
from corral.server.store.models import Device, DeviceTag, MetricName, Point, Rollup1h, Rollup1m, Series
from corral.server.store.selector_sql import to_sql
from corral.server.tsdb import TimeSeriesStore, minute_condition, series_in


@dataclass(frozen=True)
class MetricQuery:
    metric: str
    start_ms: int
    end_ms: int
    agg: Agg = "avg"
    step_ms: int | None = None
    device_id: str | None = None
    selector: str | None = None
    group: str | None = None
    by: str | None = None  # None, "device" or "tag.KEY"


@dataclass
class QueryResult:
    metric: str
    agg: str
    step_ms: int
    start_ms: int
    end_ms: int
    sources: list[str]
    series: list[dict[str, Any]]


async def device_scope(db: AsyncSession, q: MetricQuery) -> ColumnElement[bool] | None:
    """A condition on ``devices.id`` for the query's device set (None: every device)."""
    if sum(x is not None for x in (q.device_id, q.selector, q.group)) > 1:
        raise InvalidInput("give at most one of device, selector and group")
    if q.device_id is not None:
        await registry.get_device(db, q.device_id)
        return Device.id == q.device_id
    if q.selector is not None:
        return to_sql(parse(q.selector))
    if q.group is not None:
        return registry.members_clause(await registry.get_group(db, q.group))  # type: ignore[no-any-return]
    return None


async def run_query(db: AsyncSession, tsdb: TimeSeriesStore, q: MetricQuery, limits: Monitoring) -> QueryResult:
    if q.end_ms <= q.start_ms:
        raise InvalidInput("the range is empty: 'until' must be after 'since'")
    if q.by is not None and q.by != "device" and not (q.by.startswith("tag.") and len(q.by) > 4):
        raise InvalidInput("by must be 'device' or 'tag.KEY'")
    step = pick_step(q.end_ms - q.start_ms, q.step_ms)
    start = align_start(q.start_ms, step)
    metric_id = await db.scalar(select(MetricName.id).where(MetricName.name == q.metric))
    scope = await device_scope(db, q)
    if metric_id is None:
        raise NotFound(f"no device has reported metric {q.metric!r}")
    c1m, c1h = await tsdb.watermarks(db)
    segments = plan_segments(start, q.end_ms, step, c1m, c1h)
    accs: dict[tuple[str, int], Acc] = defaultdict(Acc)
    values: dict[tuple[str, int], list[float]] = defaultdict(list)
    budget = limits.max_query_rows
    for source, lo, hi in segments:
        stmt = _segment(source, q, metric_id, scope, step, lo, hi, values_only=q.agg == "p95",
                        postgres=tsdb.postgres)
        rows = (await db.execute(stmt.limit(budget + 1))).all()
        if len(rows) > budget:
            raise InvalidInput("the query reads too many points: narrow the range or the devices, or use a "
                               "larger step")
        budget -= len(rows)
        if q.agg == "p95":
            for k, b, v in rows:
                values[(k or "", int(b))].append(float(v))
        else:
            for k, b, c, s, mn, mx in rows:
                accs[(k or "", int(b))].merge(c, s, mn, mx)
    out: dict[str, list[list[float]]] = defaultdict(list)
    if q.agg == "p95":
        for (k, b), vs in sorted(values.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            v = percentile(vs, 0.95)
            if v is not None:
                out[k].append([b, v])
    else:
        for (k, b), acc in sorted(accs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            v = acc.value(q.agg)
            if v is not None:
                out[k].append([b, v])
    if len(out) > limits.max_query_series:
        raise InvalidInput(f"the query has more than {limits.max_query_series} series: narrow it")
    key_name = "device" if q.by == "device" else q.by
    series = [{"key": {key_name: k} if key_name else {}, "points": pts} for k, pts in sorted(out.items())]
    return QueryResult(metric=q.metric, agg=q.agg, step_ms=step, start_ms=start, end_ms=q.end_ms,
                       sources=[s for s, _, _ in segments], series=series)


def _segment(source: str, q: MetricQuery, metric_id: int, scope: ColumnElement[bool] | None, step: int,
             lo: int, hi: int, values_only: bool, postgres: bool = False) -> Select[Any]:
    if source == "raw":
        t, ts = Point.__table__, Point.__table__.c.ts
    else:
        t = (Rollup1m if source == "1m" else Rollup1h).__table__
        ts = t.c.bucket
    s = Series.__table__
    bucket = ((ts // step) * step).label("b")
    if q.by == "device":
        key: Any = s.c.device_id
    elif q.by:
        key = DeviceTag.__table__.c.value
    else:
        key = literal("")
    if values_only:
        value = t.c.value if source == "raw" else (t.c.sum / t.c.count)
        cols: list[Any] = [key.label("k"), bucket, value]
    elif source == "raw":
        cols = [key.label("k"), bucket, func.count(), func.sum(t.c.value), func.min(t.c.value), func.max(t.c.value)]
    else:
        cols = [key.label("k"), bucket, func.sum(t.c.count), func.sum(t.c.sum), func.min(t.c.min),
                func.max(t.c.max)]
    j = t.join(s, s.c.id == t.c.series_id)
    if q.by and q.by != "device":
        dt = DeviceTag.__table__
        j = j.outerjoin(dt, and_(dt.c.device_id == s.c.device_id, dt.c.key == q.by[4:]))
    which = [s.c.metric_id == metric_id]  # the series read
    if scope is not None:
        which.append(s.c.device_id.in_(select(Device.id).where(scope)))
    conds = [ts >= lo, ts < hi]  # the series: series_in below, a condition of the index
    if source == "raw":
        conds.append(minute_condition(t.c.minute, lo, hi))
    conds.append(series_in(t.c.series_id, which, postgres))
    stmt = select(*cols).select_from(j).where(*conds)
    if not values_only:
        stmt = stmt.group_by(key, bucket)
    return stmt


async def device_means(db: AsyncSession, tsdb: TimeSeriesStore, metric: str, scope: ColumnElement[bool],
                       lo_ms: int, hi_ms: int, since_ms: dict[str, int], step_ms: int = 10_000) -> dict[str, float]:
    """Each device's mean of ``metric`` over [lo_ms, hi_ms) (the devices ``scope`` selects), read
    in buckets of ``step_ms``; for a device in ``since_ms`` only the buckets that start at or after
    its time count (the rollout health gate: an updated device is judged on its new version).
    Devices without points are absent; an unknown metric gives ``{}``."""
    metric_id = await db.scalar(select(MetricName.id).where(MetricName.name == metric))
    if metric_id is None or hi_ms <= lo_ms:
        return {}
    start = align_start(lo_ms, step_ms)
    q = MetricQuery(metric, start, hi_ms, step_ms=step_ms, by="device")
    c1m, c1h = await tsdb.watermarks(db)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for source, lo, hi in plan_segments(start, hi_ms, step_ms, c1m, c1h):
        stmt = _segment(source, q, metric_id, scope, step_ms, lo, hi, values_only=False, postgres=tsdb.postgres)
        for device, bucket, count, total, _mn, _mx in (await db.execute(stmt)).all():
            if bucket >= since_ms.get(device, 0):
                acc = sums[device]
                acc[0] += count
                acc[1] += total
    return {d: total / count for d, (count, total) in sums.items() if count}
