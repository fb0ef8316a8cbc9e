"""The message bus between the parts of a server, and between server replicas.

Subjects are dot-separated tokens (NATS style); subscriptions may use ``*`` for one token.
The in-process bus is the embedded default; a NATS bus (``--bus nats://...``) carries the same
subjects between replicas, so a device on replica A gets a command created on replica B.

Subjects in use:
    device.<id>.command   a command was queued for the device (payload: command id)
    device.<id>.close     close the device's live session (payload: close code, ascii)
    device.<id>.status    the device's admission status changed (payload: new status)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[None]]


class Bus(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, subject: str, data: bytes) -> None: ...
    async def subscribe(self, pattern: str, handler: Handler) -> None: ...


def subject_matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p and p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))


@dataclass
class _Sub:
    pattern: str
    handler: Handler


class LocalBus:
    """In-process delivery: handlers run as tasks so a slow one cannot block the publisher."""

    def __init__(self) -> None:
        self._subs: list[_Sub] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def subscribe(self, pattern: str, handler: Handler) -> None:
        self._subs.append(_Sub(pattern, handler))

    async def publish(self, subject: str, data: bytes) -> None:
        for sub in self._subs:
            if subject_matches(sub.pattern, subject):
                task = asyncio.create_task(self._run(sub.handler, subject, data))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(handler: Handler, subject: str, data: bytes) -> None:
        try:
            await handler(subject, data)
        except Exception:  # a handler's bug must not take the bus down
            log.exception("bus handler failed for %s", subject)


def make_bus(url: str) -> Bus:
    if not url:
        return LocalBus()
    if url.startswith("nats://"):
        from corral.server.bus_nats import NatsBus

        bus: Bus = NatsBus(url)
        return bus
    from corral.errors import InvalidInput

    raise InvalidInput(f"unsupported bus {url!r}: use nats://HOST:PORT or leave empty for in-process")
