"""The server's periodic jobs: rollups, retention, alert evaluation, and re-signing TUF
metadata before it expires (``corral.server.updates.tuf_repo.resign_due``).

Each job is a loop with its own period (``ServerConfig.monitoring``) that survives its own
failures (logged, retried next period). With several replicas every replica runs the loops;
the jobs themselves make that safe (the rollup takes an advisory lock on PostgreSQL, retention
deletes are idempotent, alert state changes are conditional updates).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from corral.server.context import ServerContext

log = logging.getLogger(__name__)

#: series per rollup statement on SQLite (each its own short write transaction)
ROLLUP_CHUNK_SERIES = 2000


class Monitor:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._tasks: list[asyncio.Task[None]] = []
        self.rollups = 0

    def start(self) -> None:
        m = self.ctx.config.monitoring
        self._tasks = [
            asyncio.create_task(self._every(m.rollup_interval, self.rollup_once, "rollup"), name="corral-rollup"),
            asyncio.create_task(self._every(m.prune_interval, self.prune_once, "retention"), name="corral-prune"),
            asyncio.create_task(self._every(m.alert_interval, self.alerts_once, "alerts"), name="corral-alerts"),
            asyncio.create_task(self._every(self.ctx.config.updates.resign_interval, self.resign_once, "tuf-resign"),
                                name="corral-tuf-resign"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _every(self, period: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s job failed", what)

    async def rollup_once(self) -> dict[str, int]:
        ctx, ts = self.ctx, self.ctx.tsdb
        if not ctx.sqlite:  # MVCC: one transaction does not hold up ingestion
            async with ctx.writer() as db:
                stats = await ts.rollup(db, time.time())
        else:
            # SQLite has one writer: run the plan in short transactions so that telemetry
            # batches (and their acks) interleave with a big rollup instead of waiting it out
            async with ctx.writer() as db:
                plan = await ts.rollup_plan(db, time.time(), chunk=ROLLUP_CHUNK_SERIES)
            if plan is None:
                return {}
            for step in plan.steps:
                async with ctx.writer() as db:
                    await ts.rollup_step(db, step)
            async with ctx.writer() as db:
                await ts.rollup_finish(db, plan)
            stats = plan.stats
        self.rollups += 1
        if stats.get("late_devices"):
            log.info("rollup: %s", stats)
        return stats

    async def alerts_once(self) -> dict[str, list[tuple[str, str]]]:
        from corral.server.alerts import evaluate_all

        return await evaluate_all(self.ctx)

    async def resign_once(self, now: float | None = None) -> list[str]:
        """Re-sign the TUF roles close to their expiry; the roles re-signed."""
        from corral.server.updates.tuf_repo import resign_due

        async with self.ctx.writer() as db:
            done = await resign_due(db, self.ctx.tuf, self.ctx.config.updates, time.time() if now is None else now)
        if done:
            log.info("TUF metadata re-signed: %s", ", ".join(done))
        return done

    async def prune_once(self) -> dict[str, int]:
        async with self.ctx.writer() as db:
            out = await self.ctx.tsdb.prune(db, time.time(), self.ctx.config.monitoring.retention)
        if any(out.values()):
            log.info("retention: deleted %s", out)
        return out
