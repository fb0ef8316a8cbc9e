"""``corral server init`` and ``corral server``: prepare a data dir and run the server."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import uvicorn
from sqlalchemy import func, select

from corral.errors import Conflict
from corral.server import auth
from corral.server.app import create_asgi
from corral.server.config import ServerConfig
from corral.server.secrets import ensure_audit_key, load_audit_key
from corral.server.store import migrate
from corral.server.store.db import create_engine, session_factory
from corral.server.store.models import User

SETTINGS_FILE = "server.toml"


def prepare_data_dir(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)


def saved_db_url(data_dir: Path) -> str:
    """The database chosen at init is remembered, so ``corral server --data-dir D`` finds it again."""
    path = data_dir / SETTINGS_FILE
    if path.exists():
        return str(tomllib.loads(path.read_text()).get("db", ""))
    return ""


def save_settings(data_dir: Path, db_url: str) -> None:
    path = data_dir / SETTINGS_FILE
    path.write_text(tomli_w.dumps({"db": db_url}))
    os.chmod(path, 0o600)


async def _has_users(url: str) -> bool:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as db:
            return bool(await db.scalar(select(func.count()).select_from(User)))
    finally:
        await engine.dispose()


async def _create_admin(config: ServerConfig, name: str) -> dict[str, Any]:
    from corral.server import audit

    engine = create_engine(config.database_url)
    try:
        async with session_factory(engine)() as db, db.begin():
            password = auth.new_password()
            user = await auth.create_user(db, name, "admin", password)
            token, _ = await auth.issue_token(db, user, "init")
            await audit.record(db, load_audit_key(config.data_dir), actor="system", action="server.init",
                               target=name, detail={"admin": name})
        return {"admin_user": name, "admin_password": password, "api_token": token}
    finally:
        await engine.dispose()


async def _ensure_tuf_repository(config: ServerConfig) -> None:
    """The TUF keys (created once) and root/targets/snapshot/timestamp version 1 (ADR 0011)."""
    import time

    from corral.server.updates import tuf_repo
    from corral.server.updates.artifacts import remove_stale_uploads

    keys = tuf_repo.ensure_keys(config.data_dir)
    config.artifact_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_uploads(config.artifact_dir, time.time())
    engine = create_engine(config.database_url)
    try:
        async with session_factory(engine)() as db, db.begin():
            await tuf_repo.create(db, keys, config.updates, time.time())
    finally:
        await engine.dispose()


def init(config: ServerConfig, admin_user: str = "admin") -> dict[str, Any] | None:
    """Create the data dir, secrets, schema and the first admin. Returns the admin's credentials,
    or None when the installation already has users (its data is reused as it is)."""
    prepare_data_dir(config.data_dir)
    ensure_audit_key(config.data_dir)
    if config.db_url:
        save_settings(config.data_dir, config.db_url)
    migrate.upgrade(config.database_url)
    asyncio.run(_ensure_tuf_repository(config))
    if asyncio.run(_has_users(config.database_url)):
        return None
    creds = asyncio.run(_create_admin(config, admin_user))
    creds.update({"url": config.public_url, "data_dir": str(config.data_dir.resolve())})
    return creds


def init_strict(config: ServerConfig, admin_user: str = "admin") -> dict[str, Any]:
    creds = init(config, admin_user)
    if creds is None:
        raise Conflict(f"{config.data_dir} is already initialized; its admin credentials were shown at init")
    return creds


GC_THRESHOLDS = (20_000, 20, 20)


def serve(config: ServerConfig) -> None:
    logging.basicConfig(level=os.environ.get("CORRAL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_asgi(config)
    # The server allocates millions of short-lived tuples (telemetry rows, frames) and holds
    # many long-lived objects (sessions): with the default thresholds (700, 10, 10) the cyclic
    # collector ran for about half of the ingest path's time. Collect the young generation a
    # thirty times less often; objects alive after startup are frozen out of it (lifespan).
    gc.set_threshold(*GC_THRESHOLDS)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop",
        http="httptools",
        ws=os.environ.get("CORRAL_WS_IMPL", "websockets-sansio"),
        ws_max_size=config.limits.max_frame_bytes,
        ws_ping_interval=None,  # the device protocol has its own heartbeat
        log_level=os.environ.get("CORRAL_LOG_LEVEL", "info").lower(),
        access_log=bool(os.environ.get("CORRAL_ACCESS_LOG")),
        timeout_graceful_shutdown=5,
        backlog=4096,
    )
    uvicorn.Server(uv).run()
