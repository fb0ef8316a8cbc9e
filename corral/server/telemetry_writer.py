"""Telemetry writes: many devices' batches stored together, then each acked.

At fleet scale telemetry is the bulk of all writes (10,000 devices every 10 s is 1,000 batches a
second). One transaction per batch -- or even a few statements per batch inside a shared one --
spends the time in round trips to the database thread or server. So the hub hands each checked
batch to the :class:`TelemetryWriter` and waits; a flusher takes everything that queued while
the previous flush ran and stores it with one statement per table
(:meth:`TimeSeriesStore.ingest_many`) in one transaction. Under light load a flush is one batch
and nothing waits; under heavy load flushes grow and the cost per point falls. SQLite has one
flusher (one writer at a time anyway); PostgreSQL a few, whose transactions overlap (two
flushes holding the same batch are settled by its receipt: the second finds it stored).

If a flush fails (say one device exceeded its series limit), it is rolled back and every batch
in it is retried alone, so only the offending device's batch fails. Allow-list actions reported
in a batch are audited and announced to webhooks in the flush's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral import protocol as p
from corral.server import webhooks
from corral.server.tsdb import Incoming

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from corral.server.context import ServerContext

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    item: Incoming
    actions: list[p.Event]
    fut: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TelemetryWriter:
    def __init__(self, ctx: ServerContext, max_batches: int = 2000, max_points: int = 200_000,
                 flushers: int = 1) -> None:
        self.ctx = ctx
        self.flushers = max(1, flushers)
        self.max_batches = max_batches
        self.max_points = max_points
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.flushes = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name=f"corral-telemetry-writer-{i}")
                       for i in range(self.flushers)]

    async def stop(self) -> None:
        """Store what is queued, then stop."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), 10)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def write(self, item: Incoming, actions: list[p.Event]) -> bool:
        """Store one batch; True once committed, False if it was stored before (a duplicate)."""
        self.ctx.tsdb.prepare(item)
        pending = _Pending(item, actions)
        self._queue.put_nowait(pending)
        return await pending.fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            points = len(batch[0].item.batch.points)
            while (len(batch) < self.max_batches and points < self.max_points and not self._queue.empty()):
                nxt = self._queue.get_nowait()
                batch.append(nxt)
                points += len(nxt.item.batch.points)
            try:
                await self._flush(batch)
            except Exception:  # never let the flusher die: fail the batches, keep serving
                log.exception("telemetry flush failed")
                for pb in batch:
                    if not pb.fut.done():
                        pb.fut.set_exception(RuntimeError("telemetry could not be stored"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _flush(self, batch: list[_Pending]) -> None:
        ctx = self.ctx
        try:
            async with ctx.writer() as db:
                stored, new = await ctx.tsdb.ingest_many(db, [pb.item for pb in batch])
                announced = await self._actions(db, batch, stored)
        except Exception as e:
            if len(batch) == 1:
                if not batch[0].fut.done():
                    batch[0].fut.set_exception(e)
                return
            for pb in batch:  # isolate the failure: every batch alone
                await self._flush([pb])
            return
        ctx.tsdb.remember(new)
        self.flushes += 1
        if announced:
            webhooks.notify(ctx)
        for pb, ok in zip(batch, stored, strict=True):
            if not pb.fut.done():
                pb.fut.set_result(ok)

    async def _actions(self, db: AsyncSession, batch: list[_Pending], stored: list[bool]) -> bool:
        """What devices did on their own authority (allow-list kills and reports): into the
        audit log and to webhooks, once (only for batches stored now, not duplicates)."""
        announced = False
        for pb, ok in zip(batch, stored, strict=True):
            if not ok:
                continue
            dev = pb.item.device_id
            for e in pb.actions:
                await self.ctx.audit(db, f"device:{dev}", "device.rule_action", dev, {"message": e.message, **e.attrs})
                await webhooks.enqueue(db, "device.rule_action",
                                       {"device_id": dev, "severity": e.severity, "message": e.message,
                                        "attrs": dict(e.attrs), "at": webhooks.iso_utc(e.ts / 1000)}, pb.item.now)
                announced = True
        return announced
