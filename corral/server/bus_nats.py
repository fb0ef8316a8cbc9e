"""The bus over NATS, for several server replicas sharing one PostgreSQL database.

Subjects are the same as the in-process bus's, under a ``corral.`` prefix so one NATS server
can serve other things too. Core NATS (at-most-once) is enough here: every message is a hint
to act on state that is already committed to the database (a queued command is also delivered
when the device next connects), so a lost message delays but never loses work.
"""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from corral.errors import CorralError
from corral.server.bus import Handler

log = logging.getLogger(__name__)
PREFIX = "corral."


class NatsBus:
    def __init__(self, url: str) -> None:
        self.url = url
        self._nc: Client | None = None
        self._pending: list[tuple[str, Handler]] = []

    async def start(self) -> None:
        try:
            self._nc = await nats.connect(self.url, name="corral-server", connect_timeout=5,
                                          max_reconnect_attempts=-1, reconnect_time_wait=1)
        except (OSError, TimeoutError, nats.errors.NoServersError) as e:
            raise CorralError(f"cannot connect to the bus at {self.url}: {e}") from e
        for pattern, handler in self._pending:
            await self._subscribe(pattern, handler)
        self._pending.clear()

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()

    async def subscribe(self, pattern: str, handler: Handler) -> None:
        if self._nc is None:
            self._pending.append((pattern, handler))
        else:
            await self._subscribe(pattern, handler)

    async def _subscribe(self, pattern: str, handler: Handler) -> None:
        assert self._nc is not None

        async def on_msg(msg: Msg) -> None:
            try:
                await handler(msg.subject[len(PREFIX):], msg.data)
            except Exception:
                log.exception("bus handler failed for %s", msg.subject)

        await self._nc.subscribe(PREFIX + pattern, cb=on_msg)

    async def publish(self, subject: str, data: bytes) -> None:
        assert self._nc is not None, "bus not started"
        await self._nc.publish(PREFIX + subject, data)
