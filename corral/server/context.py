"""The server's shared state: config, database, bus, hub, secrets. One per process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from corral.server import audit
from corral.server.auth import Principal
from corral.server.config import ServerConfig

if TYPE_CHECKING:
    from corral.server.bus import Bus
    from corral.server.groupcommit import GroupCommitter
    from corral.server.hub import Hub
    from corral.server.remote import Relay
    from corral.server.telemetry_writer import TelemetryWriter
    from corral.server.tsdb import TimeSeriesStore
    from corral.server.updates.rollout_engine import RolloutEngine
    from corral.server.updates.tuf_repo import Keys


@dataclass
class ServerContext:
    config: ServerConfig
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    audit_key: bytes
    bus: Bus
    hub: Hub | None = None
    commits: GroupCommitter = None  # type: ignore[assignment]  # set by the app at startup
    tsdb: TimeSeriesStore = None  # type: ignore[assignment]  # set by the app at startup
    telemetry: TelemetryWriter = None  # type: ignore[assignment]  # set by the app at startup
    tuf: Keys = None  # type: ignore[assignment]  # the TUF signing keys, loaded by the app at startup
    rollouts: RolloutEngine | None = None  # started by the app
    relay: Relay | None = None  # remote-access sessions relayed by this replica (started by the app)
    sqlite: bool = True
    # SQLite has one writer: serialising our write transactions in-process avoids
    # SQLITE_BUSY_SNAPSHOT on read-then-write and keeps the audit chain linear.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # API token -> (trusted until, monotonic; principal): see api.deps.TOKEN_CACHE_SECONDS
    token_cache: dict[str, tuple[float, Principal]] = field(default_factory=dict)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as s:
            yield s

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[AsyncSession]:
        """A write transaction, committed on success and rolled back on any error."""
        if self.sqlite:
            async with self.write_lock, self.sessions() as s, s.begin():
                yield s
        else:
            async with self.sessions() as s, s.begin():
                yield s

    async def audit(self, db: AsyncSession, who: Principal | str, action: str, target: str = "",
                    detail: dict[str, Any] | None = None, request_id: str = "") -> None:
        actor = who if isinstance(who, str) else f"user:{who.name}"
        await audit.record(db, self.audit_key, actor=actor, action=action, target=target,
                           detail=detail, request_id=request_id)
