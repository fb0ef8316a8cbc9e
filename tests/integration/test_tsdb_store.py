"""The time-series store against real SQLite and PostgreSQL, in process: receipts make ingestion
idempotent, rollups follow the receipts (late backfill included) and keep their watermarks, hour
rollups are built from minute rollups, and retention deletes by age per resolution."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import text

from corral.core.ingest import CleanBatch
from corral.server.config import Retention
from corral.server.store.db import create_engine, is_sqlite, session_factory
from corral.server.tsdb import HOUR_MS, MINUTE_MS, TimeSeriesStore

DEV = "d" * 32
T0 = 1_800_000_000_000 - (1_800_000_000_000 % HOUR_MS)  # an hour edge, epoch ms


def batch(points: list[tuple[str, int, float]]) -> CleanBatch:
    ts = [t for _, t, _ in points]
    return CleanBatch(points=points, min_ts=min(ts), max_ts=max(ts))


def open_store(db_url: str) -> tuple[Any, Any, TimeSeriesStore]:
    engine = create_engine(db_url)
    return engine, session_factory(engine), TimeSeriesStore(postgres=not is_sqlite(db_url))


async def add_device(sessions: Any, device_id: str) -> None:
    async with sessions() as db, db.begin():
        await db.execute(text("INSERT INTO devices (id, public_key, status, created_at, updated_at, online,"
                              " inventory) VALUES (:id, :pk, 'accepted', 0, 0, false, '{}')"),
                         {"id": device_id, "pk": device_id.encode()[:32]})


def test_ingest_rollup_backfill_and_retention(db_url: str) -> None:
    async def go() -> None:
        engine, sessions, store = open_store(db_url)
        try:
            await add_device(sessions, DEV)

            async def ingest(seq: int, pts: list[tuple[str, int, float]], received: float) -> bool:
                async with sessions() as db, db.begin():
                    stored, new = await store.ingest(db, DEV, seq, batch(pts), None, received)
                store.remember(new)
                return stored

            async def q(sql: str) -> list[tuple]:
                async with sessions() as db:
                    return [tuple(r) for r in (await db.execute(text(sql))).all()]

            # two hours of one point per 10 s, in one batch per minute, received live
            for m in range(120):
                pts = [("cpu.percent", T0 + m * MINUTE_MS + i * 10_000, float(m)) for i in range(6)]
                assert await ingest(m + 1, pts, (T0 + (m + 1) * MINUTE_MS) / 1000)
            assert not await ingest(5, [("cpu.percent", T0, 99.0)], T0 / 1000 + 7200)  # a duplicate seq
            now = (T0 + 2 * HOUR_MS + 5 * MINUTE_MS) / 1000
            async with sessions() as db, db.begin():
                stats = await store.rollup(db, now, recent_ms=10 * HOUR_MS)
            assert stats["devices"] == 1
            assert await q("SELECT count(*), sum(count) FROM rollup_1m") == [(120, 720)]
            assert await q("SELECT bucket, count, min, max FROM rollup_1h ORDER BY bucket") == [
                (T0, 360, 0.0, 59.0), (T0 + HOUR_MS, 360, 60.0, 119.0)]
            async with sessions() as db:
                c1m, c1h = await store.watermarks(db)
            assert c1h == T0 + 2 * HOUR_MS and c1m >= c1h
            # late data for the first minute (a device back from an outage) lands in old buckets
            assert await ingest(1000, [("cpu.percent", T0 + 5_000, 1000.0)], now + 60)
            async with sessions() as db, db.begin():
                stats = await store.rollup(db, now + 120, recent_ms=10 * MINUTE_MS)
            assert stats["late_devices"] == 1
            assert await q(f"SELECT count, max FROM rollup_1m WHERE bucket = {T0}") == [(7, 1000.0)]
            assert await q(f"SELECT count, max FROM rollup_1h WHERE bucket = {T0}") == [(361, 1000.0)]
            # nothing new: the next run does nothing
            async with sessions() as db, db.begin():
                assert await store.rollup(db, now + 121) in ({}, {"devices": 0, "late_devices": 0})
            # retention: 8 days later raw points are gone, rollups stay until their own age
            later = now + 8 * 86400
            async with sessions() as db, db.begin():
                out = await store.prune(db, later, Retention())
            assert out["points"] == 721 and out["rollup_1m"] == 0 and out["telemetry_batches"] == 121
            assert await q("SELECT count(*) FROM points") == [(0,)]
            async with sessions() as db, db.begin():
                out = await store.prune(db, now + 31 * 86400, Retention())
            assert out["rollup_1m"] == 120 and out["rollup_1h"] == 0
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_chunked_rollup_in_short_transactions_equals_one_transaction(db_url: str) -> None:
    """SQLite runs a rollup plan one statement per transaction, series by series: the result must
    be the same as running it whole, and an interrupted run is repeated by the next."""

    async def go() -> None:
        engine = create_engine(db_url)
        sessions = session_factory(engine)
        store = TimeSeriesStore(postgres=not is_sqlite(db_url))
        try:
            for i in range(3):
                await add_device(sessions, f"{i}" * 32)
            for i in range(3):
                async with sessions() as db, db.begin():
                    pts = [(f"m{k}", T0 + j * 10_000, float(i * 100 + j)) for k in range(4) for j in range(90)]
                    _, new = await store.ingest(db, f"{i}" * 32, 1, batch(pts), None, T0 / 1000 + 900)
                store.remember(new)
            now = T0 / 1000 + 2 * 3600
            async with sessions() as db, db.begin():
                plan = await store.rollup_plan(db, now, recent_ms=10 * HOUR_MS, chunk=5)
            assert plan is not None and len(plan.steps) > 3
            # "crash" after half the steps: watermarks unchanged, so the next run redoes all
            for step in plan.steps[: len(plan.steps) // 2]:
                async with sessions() as db, db.begin():
                    await store.rollup_step(db, step)
            async with sessions() as db, db.begin():
                again = await store.rollup_plan(db, now, recent_ms=10 * HOUR_MS, chunk=5)
            assert again is not None and again.steps == plan.steps
            for step in again.steps:
                async with sessions() as db, db.begin():
                    await store.rollup_step(db, step)
            async with sessions() as db, db.begin():
                await store.rollup_finish(db, again)
            async with sessions() as db:
                chunked = (await db.execute(text("SELECT * FROM rollup_1m ORDER BY series_id, bucket"))).all()
                hours = (await db.execute(text("SELECT * FROM rollup_1h ORDER BY series_id, bucket"))).all()
                whole = (await db.execute(text(
                    "SELECT series_id, (ts / 60000) * 60000, count(*), sum(value), min(value), max(value)"
                    " FROM points GROUP BY series_id, (ts / 60000) * 60000 ORDER BY 1, 2"))).all()
            assert [tuple(r) for r in chunked] == [tuple(r) for r in whole]
            assert len(hours) == 12 and sum(r[2] for r in hours) == 3 * 4 * 90
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_telemetry_writer_stores_many_devices_together_and_isolates_a_failure(db_url: str, tmp_path: Path) -> None:
    """Batches queued together share one flush; a device over its series limit fails alone, and a
    batch sent twice in the same flush is stored once."""
    from corral.server.bus import make_bus
    from corral.server.config import ServerConfig
    from corral.server.context import ServerContext
    from corral.server.telemetry_writer import TelemetryWriter
    from corral.server.tsdb import Incoming, SeriesLimitExceeded

    async def go() -> None:
        engine = create_engine(db_url)
        ctx = ServerContext(config=ServerConfig(data_dir=tmp_path, db_url=db_url), engine=engine,
                            sessions=session_factory(engine), audit_key=b"k" * 32, bus=make_bus(""),
                            sqlite=is_sqlite(db_url))
        ctx.tsdb = TimeSeriesStore(postgres=not ctx.sqlite, max_series_per_device=3)
        writer = TelemetryWriter(ctx)
        try:
            async with ctx.writer() as db:
                for i in range(20):
                    await db.execute(text("INSERT INTO devices (id, public_key, status, created_at, updated_at,"
                                          " online, inventory) VALUES (:id, :pk, 'accepted', 0, 0, false, '{}')"),
                                     {"id": f"{i:032d}", "pk": i.to_bytes(32, "big")})
            items = [Incoming(f"{i:032d}", 1, batch([("a", T0, 1.0), ("b", T0, 2.0)]), None, T0 / 1000)
                     for i in range(20)]
            greedy = Incoming(f"{0:032d}", 2, batch([(f"m{k}", T0, 1.0) for k in range(5)]), None, T0 / 1000)
            twice = Incoming(f"{1:032d}", 1, batch([("a", T0, 1.0), ("b", T0, 2.0)]), None, T0 / 1000)
            # queued before the flusher starts, so they share flushes
            futs = [asyncio.ensure_future(writer.write(it, [])) for it in [*items, greedy, twice]]
            await asyncio.sleep(0)
            writer.start()
            results = await asyncio.gather(*futs, return_exceptions=True)
            assert results[:20] == [True] * 20
            assert isinstance(results[20], SeriesLimitExceeded)
            assert results[21] is False  # the same (device, seq) as items[1]
            async with ctx.reader() as db:
                n = (await db.execute(text("SELECT count(*) FROM points"))).scalar()
                receipts = (await db.execute(text("SELECT count(*) FROM telemetry_batches"))).scalar()
                # each point belongs to a series that exists, of the metric it was sent as: the
                # retried batches do not reuse ids from the flush that rolled back
                wrong = (await db.execute(text(
                    "SELECT count(*) FROM points p LEFT JOIN series s ON s.id = p.series_id"
                    " LEFT JOIN metric_names m ON m.id = s.metric_id"
                    " WHERE m.name IS NULL OR (m.name = 'a') <> (p.value = 1.0)"))).scalar()
            assert (n, receipts, wrong) == (40, 20, 0)
        finally:
            await writer.stop()
            await engine.dispose()

    asyncio.run(go())


def test_each_minute_is_rolled_up_once_unless_late_data_reaches_back(db_url: str) -> None:
    """A run rolls up the minutes completed since the previous one; a run with no newly complete
    minute and no late data has nothing to do, however much live data arrived."""

    async def go() -> None:
        engine, sessions, store = open_store(db_url)
        try:
            await add_device(sessions, DEV)
            seq = 0

            async def live(t_ms: int, received_ms: int | None = None) -> None:  # one point
                nonlocal seq
                seq += 1
                async with sessions() as db, db.begin():
                    _, new = await store.ingest(db, DEV, seq, batch([("cpu", t_ms, float(t_ms))]), None,
                                                (received_ms or t_ms) / 1000)
                store.remember(new)

            async def plan(now_ms: int) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
                async with sessions() as db, db.begin():
                    p = await store.rollup_plan(db, now_ms / 1000, chunk=1000)
                    assert p is not None
                    for step in p.steps:
                        await store.rollup_step(db, step)
                    await store.rollup_finish(db, p)
                return [(s.kind, s.lo, s.hi) for s in p.steps], p.stats

            for k in range(30):  # minutes 10..14 of the hour, every 10 s
                await live(T0 + 10 * MINUTE_MS + k * 10_000)
            # a minute is complete once a whole minute has passed after it (and 2 s to settle)
            steps, _ = await plan(T0 + 15 * MINUTE_MS + 30_000)
            assert steps == [("1m", T0 + 10 * MINUTE_MS, T0 + 14 * MINUTE_MS)]
            await live(T0 + 15 * MINUTE_MS + 31_000)  # live data in the current minute
            steps, stats = await plan(T0 + 15 * MINUTE_MS + 40_000)
            assert steps == [] and stats["late_devices"] == 0
            steps, stats = await plan(T0 + 16 * MINUTE_MS + 10_000)  # minute 14 is now complete
            assert steps == [("1m", T0 + 14 * MINUTE_MS, T0 + 15 * MINUTE_MS)] and stats["minutes"] == 1
            # late: received now, measured in a minute rolled up already
            await live(T0 + 11 * MINUTE_MS + 5_000, received_ms=T0 + 16 * MINUTE_MS + 12_000)
            steps, stats = await plan(T0 + 16 * MINUTE_MS + 20_000)
            assert stats["late_devices"] == 1
            assert ("1m", T0 + 11 * MINUTE_MS, T0 + 15 * MINUTE_MS) in steps
            async with sessions() as db:
                got = (await db.execute(text(
                    f"SELECT count FROM rollup_1m WHERE bucket = {T0 + 11 * MINUTE_MS}"))).scalar()
            assert got == 7
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_latest_value_per_metric_recent_and_quiet(db_url: str) -> None:
    """The latest point of each metric: one reported a moment ago, one quiet for hours (found
    through its last minute rollup), and one whose raw points retention removed (left out)."""
    async def go() -> None:
        engine, sessions, store = open_store(db_url)
        try:
            await add_device(sessions, DEV)
            now = T0 + 5 * HOUR_MS
            batches = [[("quiet", T0 + 10_000, 1.0), ("quiet", T0 + 20_000, 2.0), ("gone", T0, 5.0)],
                       [("busy", now - 25_000, 7.0), ("busy", now - 15_000, 8.0)],
                       [("busy", now - 5_000, 9.0)]]
            for seq, pts in enumerate(batches, 1):
                async with sessions() as db, db.begin():
                    _, new = await store.ingest(db, DEV, seq, batch(pts), None, now / 1000)
                store.remember(new)
            async with sessions() as db:  # before any rollup: found in the raw points, however old
                assert [n for n, _, _ in await store.latest(db, DEV, now, 5 * MINUTE_MS)] == ["busy", "gone", "quiet"]
            async with sessions() as db, db.begin():  # once the receipts settled
                assert (await store.rollup(db, now / 1000 + 5, recent_ms=10 * HOUR_MS))["devices"] == 1
            async with sessions() as db, db.begin():  # only "gone"'s minute is older than an hour
                await db.execute(text("DELETE FROM points WHERE series_id IN (SELECT s.id FROM series s"
                                      " JOIN metric_names m ON m.id = s.metric_id WHERE m.name = 'gone')"))
            async with sessions() as db:
                got = await store.latest(db, DEV, now, 5 * MINUTE_MS)
                assert await store.latest(db, "e" * 32, now, 5 * MINUTE_MS) == []
            assert got == [("busy", now - 5_000, 9.0), ("quiet", T0 + 20_000, 2.0)]
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_raw_points_are_searched_by_minute_and_series_never_scanned(tmp_path: Path) -> None:
    """Every statement that reads or deletes raw points -- metric queries of each shape, alert
    aggregates, latest values, rollups, retention -- is captured as run and planned by SQLite:
    each must search the (minute, series_id, ts) key, by series too unless it is about every
    series, never read the table from end to end (``SCAN``). Planning is deterministic, so
    this catches a query that would slow down with the table's size without timing anything."""
    import re
    import sqlite3

    from sqlalchemy import event

    from corral.server import alerts
    from corral.server.config import Monitoring
    from corral.server.metrics_query import MetricQuery, run_query
    from corral.server.store import migrate
    from corral.server.store.models import Alert

    path = tmp_path / "plans.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)

    async def go() -> list[tuple[str, Any]]:
        engine, sessions, store = open_store(url)
        seen: list[tuple[str, Any]] = []

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            if re.search(r"\b(FROM|JOIN) points\b", statement) and not many:
                seen.append((statement, params))

        try:
            devs = [c * 32 for c in "abc"]
            for i, d in enumerate(devs):
                await add_device(sessions, d)
                async with sessions() as db, db.begin():
                    await db.execute(text("INSERT INTO device_tags (device_id, key, value) VALUES (:d, 'site', :s)"),
                                     {"d": d, "s": f"s{i % 2}"})
            now = T0 + HOUR_MS
            for d in devs:
                for m in range(20):
                    pts = [(n, now - (20 - m) * MINUTE_MS + k * 10_000, float(m)) for n in ("cpu", "mem")
                           for k in range(6)]
                    async with sessions() as db, db.begin():
                        _, new = await store.ingest(db, d, m + 1, batch(pts), None, now / 1000)
                    store.remember(new)
            async with sessions() as db, db.begin():
                await store.rollup(db, now / 1000 - 300, recent_ms=10 * HOUR_MS)
            async with sessions() as db, db.begin():  # a later run, in chunks, as SQLite runs it
                plan = await store.rollup_plan(db, now / 1000, chunk=2)
                assert plan is not None
                for step in plan.steps:
                    await store.rollup_step(db, step)
            shapes: list[dict[str, Any]] = [
                dict(device_id=devs[0]), dict(selector='tag.site == "s0"'), {}, dict(by="device"),
                dict(by="tag.site"), dict(agg="p95"), dict(step_ms=10_000), dict(step_ms=10_000, by="tag.site")]
            async with sessions() as db:
                for shape in shapes:
                    r = await run_query(db, store, MetricQuery(metric="cpu", start_ms=now - 15 * MINUTE_MS,
                                                               end_ms=now, **shape), Monitoring())
                    assert r.series, shape
                assert len(await store.latest(db, devs[0], now, 5 * MINUTE_MS)) == 2
                alert = Alert(id="a", name="a", kind="threshold", selector='tag.site == "s1"', expr="avg(cpu) > 1",
                              by_tag="site", window_s=300.0)
                for fn in ("avg", "p95"):
                    values = await alerts._aggregates(db, alert, frozenset({(fn, "cpu")}), now / 1000)
                    assert values["s1"][(fn, "cpu")] is not None
            async with sessions() as db, db.begin():
                await store.prune(db, (now + 7 * 86400_000) / 1000, Retention())
        finally:
            await engine.dispose()
        return seen

    seen = asyncio.run(go())
    assert len(seen) >= 12, [s for s, _ in seen]
    with sqlite3.connect(path) as db:
        for statement, params in seen:
            plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement, params)]
            on_points = [step for step in plan if step.split(" ")[1:2] in (["points"], ["p"])]
            assert on_points and all(step.startswith("SEARCH") for step in on_points), (statement, plan)
            # reading every series of a minute is right only for retention and whole-fleet rollups
            every_series = statement.startswith("DELETE FROM points") or " 1 = 1 " in statement
            assert every_series or all("series_id" in step for step in on_points), (statement, plan)
