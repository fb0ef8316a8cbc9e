"""The time-series store against real SQLite and PostgreSQL, in process: receipts make ingestion
idempotent, rollups follow the receipts (late backfill included) and keep their watermarks, hour
rollups are built from minute rollups, and retention deletes by age per resolution."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from corral.core.ingest import CleanBatch
from corral.server.config import Retention
from corral.server.store import migrate
from corral.server.store.db import create_engine, is_sqlite, session_factory
from corral.server.tsdb import HOUR_MS, MINUTE_MS, TimeSeriesStore
from tests.conftest import drop_pg_database, make_pg_database

DEV = "d" * 32
T0 = 1_800_000_000_000 - (1_800_000_000_000 % HOUR_MS)  # an hour edge, epoch ms


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = make_pg_database() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'ts.db'}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if request.param == "postgresql":
            drop_pg_database(url)


def batch(points: list[tuple[str, int, float]]) -> CleanBatch:
    ts = [t for _, t, _ in points]
    return CleanBatch(points=points, min_ts=min(ts), max_ts=max(ts))


def test_ingest_rollup_backfill_and_retention(db_url: str) -> None:
    async def go() -> None:
        engine = create_engine(db_url)
        sessions = session_factory(engine)
        store = TimeSeriesStore(postgres=not is_sqlite(db_url))
        try:
            async with sessions() as db, db.begin():
                await db.execute(text("INSERT INTO devices (id, public_key, status, created_at, updated_at, online,"
                                      " inventory) VALUES (:id, :pk, 'accepted', 0, 0, false, '{}')"),
                                 {"id": DEV, "pk": b"k" * 32})

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
