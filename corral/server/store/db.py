"""Engines and sessions for SQLite (WAL, the embedded default) and PostgreSQL.

URLs are accepted in their plain form (``sqlite:///path``, ``postgresql://...``) and mapped to
the async drivers (aiosqlite, asyncpg). Migrations run through alembic at ``server init`` and
at every ``server`` start, before the event loop serves anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from corral.errors import InvalidInput


def async_url(url: str) -> str:
    """Map a user-facing database URL to its async driver form."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+asyncpg")
    else:
        raise InvalidInput(f"unsupported database {backend!r}: use sqlite:///PATH or postgresql://...")
    return u.render_as_string(hide_password=False)


def sqlite_url_for(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'corral.db').resolve()}"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    aurl = async_url(url)
    if is_sqlite(url):
        engine = create_async_engine(aurl, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        engine = create_async_engine(aurl, **kwargs)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
