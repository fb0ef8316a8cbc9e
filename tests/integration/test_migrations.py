"""Migrations build exactly the schema the models describe, on both engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from corral.server.store import migrate


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_migrations_match_the_models(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if engine == "postgresql" else f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    migrate.upgrade(url)  # idempotent
    errors: list[BaseException] = []

    def check() -> None:
        try:
            command.check(migrate.alembic_config(url))  # raises if autogenerate would change anything
        except BaseException as e:
            errors.append(e)

    import threading

    t = threading.Thread(target=check)
    t.start()
    t.join()
    assert not errors, errors[0]
