"""The dashboard's count of the software the fleet runs (corral.server.console_fleet), in SQL on
SQLite and PostgreSQL: only accepted devices, any inventory shape (no software, null, not an
object, numbers as versions) read without an error."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import text

from corral.server.console_fleet import software_versions
from corral.server.store.db import create_engine, session_factory

DEVICES: list[tuple[str, str, Any]] = [
    ("a" * 32, "accepted", {"software": {"app.sensor": "1.0", "rootfs": "r7", "corral-agent": "0.1"}}),
    ("b" * 32, "accepted", {"software": {"app.sensor": "1.0", "corral-agent": "0.2"}}),
    ("c" * 32, "accepted", {"software": {"app.sensor": "2.0", "app.n": 3}}),
    ("d" * 32, "pending", {"software": {"app.sensor": "9.9"}}),  # not in the fleet yet
    ("e" * 32, "accepted", {}),
    ("f" * 32, "accepted", {"software": None}),
    ("g" * 32, "accepted", {"software": "not an object"}),
    ("h" * 32, "accepted", {"software": ["app.sensor", "1.0"]}),
]


def test_software_versions_are_counted_on_both_engines(db_url: str) -> None:
    async def go() -> dict[str, dict[str, int]]:
        engine = create_engine(db_url)
        sessions = session_factory(engine)
        try:
            async with sessions() as db, db.begin():
                for device_id, status, inventory in DEVICES:
                    await db.execute(text("INSERT INTO devices (id, public_key, status, created_at, updated_at, online,"
                                          " inventory) VALUES (:id, :pk, :status, 0, 0, false, :inv)"),
                                     {"id": device_id, "pk": device_id.encode()[:32], "status": status,
                                      "inv": json.dumps(inventory)})
            async with sessions() as db:
                return await software_versions(db)
        finally:
            await engine.dispose()

    assert asyncio.run(go()) == {"app.sensor": {"1.0": 2, "2.0": 1}, "rootfs": {"r7": 1},
                                 "corral-agent": {"0.1": 1, "0.2": 1}, "app.n": {"3": 1}}
