"""The audit hash chain on a real SQLite database, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import delete, update

from corral.server import audit
from corral.server.store.db import create_engine, session_factory
from corral.server.store.models import AuditEntry, Base

KEY = b"k" * 32


async def _chain(path: Path, n: int) -> tuple:
    engine = create_engine(f"sqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = session_factory(engine)
    for i in range(n):
        async with sessions() as db, db.begin():
            await audit.record(db, KEY, actor="user:a", action="x.do", target=str(i), detail={"i": i, "s": "ü"})
    return engine, sessions


def test_intact_chain_verifies_and_any_change_is_found(tmp_path: Path) -> None:
    async def go() -> None:
        engine, sessions = await _chain(tmp_path / "a.db", 6)
        try:
            async with sessions() as db:
                r = await audit.verify(db, KEY, batch=4)  # crosses a batch boundary
                assert r.ok and r.entries == 6
                assert not (await audit.verify(db, b"other-key" * 4)).ok  # a forger without the key
            async with sessions() as db, db.begin():
                await db.execute(update(AuditEntry).where(AuditEntry.seq == 2).values(detail={"i": 99}))
            async with sessions() as db:
                r = await audit.verify(db, KEY)
                assert not r.ok and r.seq == 2 and "altered" in r.problem
            async with sessions() as db, db.begin():
                await db.execute(update(AuditEntry).where(AuditEntry.seq == 2).values(detail={"i": 1, "s": "ü"}))
                await db.execute(delete(AuditEntry).where(AuditEntry.seq == 5))
            async with sessions() as db:
                r = await audit.verify(db, KEY)
                assert not r.ok and r.seq == 5 and "missing" in r.problem
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_empty_log_is_ok(tmp_path: Path) -> None:
    async def go() -> None:
        engine, sessions = await _chain(tmp_path / "b.db", 0)
        try:
            async with sessions() as db:
                assert (await audit.verify(db, KEY)).ok
        finally:
            await engine.dispose()

    asyncio.run(go())
