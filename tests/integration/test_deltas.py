"""Deltas end to end: the server builds and signs one from two uploaded versions, a device's
``corral tuf-client`` downloads and verifies it from the real server, and the image rebuilt from
the version it runs matches the full artifact's signed sha256."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from corral import delta
from corral.errors import NotFound
from tests.conftest import ServerProc
from tests.integration.test_artifacts import targets, upload
from tests.integration.test_tuf_client import failed, ok
from tests.integration.test_tuf_repo import tuf_client


@asynccontextmanager
async def server_ctx(s: ServerProc) -> AsyncIterator[Any]:
    """A ServerContext on the running server's database and folders (as a replica would have)."""
    from corral.server.config import ServerConfig
    from corral.server.context import ServerContext
    from corral.server.store.db import create_engine, is_sqlite, session_factory
    from corral.server.updates import tuf_repo

    config = ServerConfig(data_dir=s.data_dir, db_url=s.db_url or None)
    engine = create_engine(config.database_url)
    ctx = ServerContext(config=config, engine=engine, sessions=session_factory(engine), audit_key=b"k" * 32,
                        bus=None, sqlite=is_sqlite(config.database_url))  # type: ignore[arg-type]  # no bus
    ctx.tuf = tuf_repo.ensure_keys(s.data_dir)
    try:
        yield ctx
    finally:
        await engine.dispose()


def image(seed: int, size: int = 1 << 20) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.choice([bytes(8192), rng.randbytes(8192), b"config=1\n" * 910 + b"xx"])
                    for _ in range(size // 8192))


def changed(data: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    t = bytearray(data)
    for i in rng.sample(range(len(data) // 4096), len(data) // 4096 // 50):
        t[i * 4096:i * 4096 + 100] = rng.randbytes(100)
    return bytes(t)


def test_delta_built_signed_served_and_applied(server: ServerProc, tmp_path: Path) -> None:
    from corral.server.updates import deltas

    s = server
    v1 = image(1)
    v2 = changed(v1, 2)
    a1 = upload(s, v1, name="img", version="1.0", kind="rootfs", filename="rootfs.img").json()
    a2 = upload(s, v2, name="img", version="2.0", kind="rootfs", filename="rootfs.img").json()
    upload(s, random.Random(3).randbytes(1 << 20), name="img", version="3.0", kind="rootfs", filename="rootfs.img")

    async def build() -> tuple[Any, ...]:
        async with server_ctx(s) as ctx:
            d = await deltas.build(ctx, "img", "2.0", "1.0", level=3)
            again = await deltas.build(ctx, "img", "2.0", "1.0", level=3)  # idempotent
            unrelated = await deltas.build(ctx, "img", "3.0", "1.0", level=3)  # would not pay
            async with ctx.reader() as db:
                found = await deltas.find(db, "img", "2.0", "1.0")
                none = await deltas.find(db, "img", "1.0", "2.0")
            with pytest.raises(NotFound):
                await deltas.build(ctx, "img", "9.9", "1.0")
            return d, again, unrelated, found, none

    d, again, unrelated, found, none = asyncio.run(build())
    assert d is not None and d == again == found and unrelated is None and none is None
    assert d.target_path == "img/2.0/delta-from-1.0"
    assert (d.target_sha256, d.target_length, d.base_sha256) == (a2["sha256"], len(v2), a1["sha256"])
    assert d.length < len(v2) // 10
    signed = targets(s)[d.target_path]
    assert signed["length"] == d.length and signed["hashes"]["sha256"] == d.sha256
    assert signed["custom"]["delta"]["target_sha256"] == a2["sha256"]
    assert sorted(p.name for p in (s.data_dir / "artifacts" / "deltas").iterdir()) == [d.sha256]

    # the device: download through TUF, rebuild from the version it runs, check the full artifact's hash
    client = tuf_client(s, tmp_path)
    got = Path(ok(client.download(d.target_path)).strip())
    assert hashlib.sha256(got.read_bytes()).hexdigest() == d.sha256
    running = tmp_path / "slot-a.img"
    running.write_bytes(v1 + bytes(5000))  # a partition larger than the image
    # rebuilt where corral tuf-client keeps the full target, which it then verifies against the
    # signed metadata of the full artifact and does not download again
    new = client.target_dir / quote(a2["tuf"]["target_name"], "")
    delta.apply_file(running, got, new, target_sha256=signed["custom"]["delta"]["target_sha256"],
                     target_length=signed["custom"]["delta"]["target_length"])
    assert new.read_bytes() == v2
    inode = new.stat().st_ino
    assert Path(ok(client.download(a2["tuf"]["target_name"])).strip()) == new
    assert new.stat().st_ino == inode and new.read_bytes() == v2

    # a delta file altered on the server is refused by TUF; withdrawing removes target and file
    blob = s.data_dir / "artifacts" / "deltas" / d.sha256
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")
    failed(tuf_client(s, tmp_path, "device2").download(d.target_path))

    async def withdraw() -> list[str]:
        async with server_ctx(s) as ctx:
            return await deltas.withdraw(ctx, "img", "1.0")

    assert asyncio.run(withdraw()) == [d.target_path]
    assert d.target_path not in targets(s)
    assert list((s.data_dir / "artifacts" / "deltas").iterdir()) == []
