"""Schema migrations (alembic), run at ``server init`` and at every ``server`` start."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str) -> None:
    """Bring the database to the newest schema. Safe to call from inside an event loop:
    alembic's env runs its own loop, so it gets a thread of its own."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            command.upgrade(alembic_config(url), "head")
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name="corral-migrate")
    t.start()
    t.join()
    if errors:
        raise errors[0]


def revision(url: str, message: str) -> None:
    """Developer helper: autogenerate a migration against ``url``."""
    command.revision(alembic_config(url), message=message, autogenerate=True)
