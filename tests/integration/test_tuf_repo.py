"""The server's TUF repository: ``corral tuf-client`` (the device's verifier) against the real
server, tampering refused, the offline root key, and re-signing before expiry on a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tuf.api.metadata import Metadata

from corral.errors import NotFound
from tests.conftest import ServerProc
from tests.integration.test_artifacts import payload, tuf_versions, upload
from tests.integration.test_tuf_client import Client, failed, ok

DAY = 86400.0


def tuf_client(s: ServerProc, tmp_path: Path, name: str = "device") -> Client:
    """A device's ``corral tuf-client``, initialised with the root the management API hands out."""
    client = Client(f"{s.url}/device/v1/tuf", tmp_path / name / "metadata", tmp_path / name / "targets")
    client.metadata_dir.mkdir(parents=True)
    client.target_dir.mkdir()
    root = tmp_path / name / "root.json"
    r = s.api("GET", "/tuf/root.json")
    assert r.status_code == 200
    root.write_bytes(r.content)
    ok(client.init(root))
    return client


def test_tuf_client_verifies_downloads_from_the_server(any_server: ServerProc, tmp_path: Path) -> None:
    s = any_server
    data = payload(200_000, seed=1)
    a = upload(s, data, name="demo", version="1.0.0", filename="demo.tar.zst").json()
    client = tuf_client(s, tmp_path)
    ok(client.refresh())
    versions = tuf_versions(s)
    for role in ("root", "timestamp", "snapshot", "targets"):
        assert client.version(role) == versions[role]

    path = Path(ok(client.download(a["tuf"]["target_name"])).strip())
    assert path == client.target_dir / quote("demo/1.0.0/demo.tar.zst", "")
    assert path.read_bytes() == data

    # a new upload is seen by the next refresh; its file altered on the server's disk is refused
    b = upload(s, payload(100_000, seed=2), name="demo", version="1.1.0", filename="demo.tar.zst").json()
    blob = s.data_dir / "artifacts" / b["sha256"]
    tampered = bytearray(blob.read_bytes())
    tampered[1000] ^= 0xFF
    blob.write_bytes(bytes(tampered))
    line = failed(client.download(b["tuf"]["target_name"]))
    assert "hash" in line.lower() or "length" in line.lower(), line
    assert client.target_files() == [path.name]  # nothing of the refused file is kept

    # a deleted artifact is no longer a target
    assert s.api("DELETE", "/artifacts/demo/1.0.0").status_code == 204
    fresh = tuf_client(s, tmp_path, "device2")
    failed(fresh.download(a["tuf"]["target_name"]))
    assert fresh.target_files() == []


def test_root_key_exported_and_taken_offline(server: ServerProc, tmp_path: Path) -> None:
    s = server
    root_key = s.data_dir / "secrets" / "tuf" / "root.key"
    assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
    root = json.loads(s.api("GET", "/tuf/root.json").content)["signed"]
    [root_keyid] = root["roles"]["root"]["keyids"]
    assert root["consistent_snapshot"] is True
    assert {role: r["threshold"] for role, r in root["roles"].items()} == dict.fromkeys(
        ("root", "targets", "snapshot", "timestamp"), 1)

    copy = tmp_path / "root-copy.pem"
    r = s.cli("server", "export-root-key", "--data-dir", str(s.data_dir), "--out", str(copy), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"out": str(copy), "keyid": root_keyid, "removed_from_server": False}
    assert copy.read_bytes() == root_key.read_bytes() and stat.S_IMODE(copy.stat().st_mode) == 0o600
    r = s.cli("server", "export-root-key", "--data-dir", str(s.data_dir), "--out", str(copy))
    assert (r.returncode, r.stderr) == (1, f"error: {copy} exists: choose a new file for the root key\n")

    offline = tmp_path / "root-offline.pem"
    r = s.cli("server", "export-root-key", "--data-dir", str(s.data_dir), "--out", str(offline), "--remove")
    assert r.returncode == 0, r.stderr
    assert offline.read_bytes() == copy.read_bytes() and not root_key.exists()
    r = s.cli("server", "export-root-key", "--data-dir", str(s.data_dir), "--out", str(tmp_path / "again.pem"))
    assert r.returncode == 1 and "already offline" in r.stderr

    s.restart()  # the online keys suffice to run and sign
    assert s.api("GET", "/tuf").json()["root_key_online"] is False
    assert upload(s, payload(1000), name="demo", version="2.0").status_code == 201
    client = tuf_client(s, tmp_path)
    ok(client.download("demo/2.0/demo-2.0"))


def test_resign_job_renews_metadata_before_it_expires(db_url: str, tmp_path: Path) -> None:
    asyncio.run(_resign_on_a_fake_clock(db_url, tmp_path))


async def _resign_on_a_fake_clock(db_url: str, tmp_path: Path) -> None:
    from corral.server.config import ServerConfig
    from corral.server.context import ServerContext
    from corral.server.monitor import Monitor
    from corral.server.store.db import create_engine, is_sqlite, session_factory
    from corral.server.updates import tuf_repo

    config = ServerConfig(data_dir=tmp_path)
    engine = create_engine(db_url)
    ctx = ServerContext(config=config, engine=engine, sessions=session_factory(engine), audit_key=b"k" * 32,
                        bus=None, sqlite=is_sqlite(db_url))  # type: ignore[arg-type]  # no bus needed
    ctx.tuf = tuf_repo.ensure_keys(tmp_path)
    monitor = Monitor(ctx)
    t0 = time.time()

    async def roles() -> dict[str, Any]:
        async with ctx.reader() as db:
            return await tuf_repo.versions(db)

    async def current(role: str) -> Metadata[Any]:
        async with ctx.reader() as db:
            name = "timestamp.json" if role == "timestamp" else f"{(await roles())[role]['version']}.{role}.json"
            return Metadata.from_bytes(await tuf_repo.metadata_file(db, name))

    try:
        async with ctx.writer() as db:
            assert await tuf_repo.create(db, ctx.tuf, config.updates, t0) is True
        async with ctx.writer() as db:
            assert await tuf_repo.create(db, ctx.tuf, config.updates, t0) is False  # idempotent
        assert {r: v["version"] for r, v in (await roles()).items()} == dict.fromkeys(
            ("root", "targets", "snapshot", "timestamp"), 1)
        root = await current("root")

        assert await monitor.resign_once(now=t0 + 3600) == []  # nothing close to expiry
        # the timestamp (1 day) is re-signed once less than half of it remains
        assert await monitor.resign_once(now=t0 + 13 * 3600) == ["timestamp"]
        timestamp = await current("timestamp")
        assert timestamp.signed.version == 2
        assert timestamp.signed.expires.timestamp() == pytest.approx(t0 + 13 * 3600 + DAY, abs=1)
        root.verify_delegate("timestamp", timestamp)
        assert await monitor.resign_once(now=t0 + 14 * 3600) == []
        # the snapshot (7 days) after 3.5 days, with a timestamp that points at it
        assert await monitor.resign_once(now=t0 + 4 * DAY) == ["snapshot", "timestamp"]
        snapshot, timestamp = await current("snapshot"), await current("timestamp")
        assert (snapshot.signed.version, timestamp.signed.version) == (2, 3)
        assert timestamp.signed.snapshot_meta.version == 2
        root.verify_delegate("snapshot", snapshot)
        # after half a year: root (its key is here) and targets too; the new root is signed by the old
        assert await monitor.resign_once(now=t0 + 200 * DAY) == ["root", "targets", "snapshot", "timestamp"]
        root2 = await current("root")
        assert root2.signed.version == 2
        root.verify_delegate("root", root2)
        root2.verify_delegate("root", root2)
        targets = await current("targets")
        assert targets.signed.version == 2 and (await current("snapshot")).signed.meta["targets.json"].version == 2
        root2.verify_delegate("targets", targets)

        # an offline root key: the online roles are still renewed, root is left (with a warning)
        os.unlink(tuf_repo.key_dir(tmp_path) / "root.key")
        ctx.tuf = tuf_repo.Keys.load(tmp_path)
        assert await monitor.resign_once(now=t0 + 400 * DAY) == ["targets", "snapshot", "timestamp"]
        assert (await roles())["root"]["version"] == 2

        # superseded targets/snapshot versions beyond keep_versions are pruned; every root stays
        keep2 = dataclasses.replace(config.updates, keep_versions=2)
        for i in range(3):
            async with ctx.writer() as db:
                await tuf_repo.add_target(db, ctx.tuf, keep2, t0 + 400 * DAY, f"a/{i}", 1, "0" * 64, {})
        newest = (await roles())["targets"]["version"]
        async with ctx.reader() as db:
            for role, version, kept in [("targets", newest, True), ("targets", newest - 1, True),
                                        ("targets", newest - 2, False), ("snapshot", 1, False), ("root", 1, True)]:
                try:
                    await tuf_repo.metadata_file(db, f"{version}.{role}.json")
                    assert kept, (role, version)
                except NotFound:
                    assert not kept, (role, version)
        assert sorted((await current("targets")).signed.targets) == ["a/0", "a/1", "a/2"]
    finally:
        await engine.dispose()
