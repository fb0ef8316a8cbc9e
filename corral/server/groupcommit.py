"""Group commit: many small writes from device sessions share one transaction.

A connect storm or a command fan-out means thousands of tiny writes (a device comes online, a
command is acknowledged). One transaction each would serialise them on SQLite's single writer
and pay a commit apiece. Here each write is a coroutine function ``fn(db)``; a single flusher
runs every write that queued up while the previous batch was committing, in order, in one
transaction. Under light load a batch is one write and nothing waits; under heavy load batches
grow and the commit cost is shared.

If a batch fails, it is rolled back and every write in it is retried alone, so one bad write
(or one that raises on purpose, like a refused enrollment) affects only its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

if TYPE_CHECKING:
    from corral.server.context import ServerContext

log = logging.getLogger(__name__)
T = TypeVar("T")
WriteFn = Callable[[AsyncSession], Awaitable[Any]]


async def _execute(db: AsyncSession, stmt: Any) -> Any:
    return await db.execute(stmt)


@dataclass(slots=True)
class _Op:
    fn: WriteFn
    fut: asyncio.Future[Any]


class GroupCommitter:
    def __init__(self, ctx: ServerContext, max_batch: int = 500) -> None:
        self.ctx = ctx
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="corral-group-commit")

    async def stop(self) -> None:
        """Flush what is queued, then stop."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), 10)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, fut))
        return fut

    async def write(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await self.submit(fn)

    def write_later(self, fn: WriteFn, what: str) -> None:
        """Fire and forget; a failure is logged (used for presence and status hints)."""
        fut = self.submit(fn)

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("%s failed: %s", what, f.exception())

        fut.add_done_callback(done)

    async def execute(self, stmt: Any) -> Any:
        """One statement, group-committed; returns its result."""
        return await self.write(functools.partial(_execute, stmt=stmt))

    def execute_later(self, stmt: Any, what: str) -> None:
        """One statement, group-committed, not waited for (see ``write_later``)."""
        self.write_later(functools.partial(_execute, stmt=stmt), what)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._flush(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _flush(self, batch: list[_Op]) -> None:
        results: list[Any] = []
        try:
            async with self.ctx.writer() as db:
                for op in batch:
                    results.append(await op.fn(db))
        except Exception as e:
            if len(batch) == 1:
                if not batch[0].fut.done():
                    batch[0].fut.set_exception(e)
                return
            for op in batch:  # isolate the failure: every write alone, in order
                await self._flush([op])
            return
        self.batches += 1
        self.writes += len(batch)
        for op, r in zip(batch, results, strict=True):
            if not op.fut.done():
                op.fut.set_result(r)
