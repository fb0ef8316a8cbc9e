"""Group commit on a real SQLite database: writes share transactions, a failing write is
isolated, and order is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from corral.server.bus import LocalBus
from corral.server.config import ServerConfig
from corral.server.context import ServerContext
from corral.server.groupcommit import GroupCommitter
from corral.server.store.db import create_engine, session_factory
from corral.server.store.models import Base, Meta


async def _ctx(path: Path) -> ServerContext:
    engine = create_engine(f"sqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    return ServerContext(config=ServerConfig(data_dir=path.parent), engine=engine,
                         sessions=session_factory(engine), audit_key=b"k" * 32, bus=LocalBus())


def test_batches_share_a_transaction_and_failures_are_isolated(tmp_path: Path) -> None:
    async def go() -> None:
        ctx = await _ctx(tmp_path / "g.db")
        gc = GroupCommitter(ctx)
        gc.start()
        try:
            def put(key: str, value: str):
                async def fn(db):
                    db.add(Meta(key=key, value=value))
                    await db.flush()
                    return key
                return fn

            async def boom(db):
                db.add(Meta(key="k3", value="bad"))
                await db.flush()
                raise ValueError("refused on purpose")

            futs = [gc.submit(put(f"k{i}", str(i))) for i in range(3)]
            bad = gc.submit(boom)
            futs += [gc.submit(put(f"k{i}", str(i))) for i in range(4, 50)]
            done = await asyncio.gather(*futs)
            assert done == [f"k{i}" for i in range(50) if i != 3]
            with pytest.raises(ValueError, match="on purpose"):
                await bad
            # a duplicate key fails alone; the writes around it land
            dup = gc.submit(put("k1", "again"))
            after = gc.submit(put("k99", "x"))
            with pytest.raises(Exception, match=r"UNIQUE|unique"):
                await dup
            assert await after == "k99"
            async with ctx.reader() as db:
                keys = set((await db.scalars(select(Meta.key))).all())
            assert keys == {f"k{i}" for i in range(50) if i != 3} | {"k99"}
            # writes queued together commit together: one batch, one transaction
            before = gc.batches
            assert await asyncio.gather(*[gc.submit(put(f"b{i}", "x")) for i in range(20)]) == [
                f"b{i}" for i in range(20)]
            assert gc.batches == before + 1
        finally:
            await gc.stop()
            await ctx.engine.dispose()

    asyncio.run(go())
