"""Corral's database: one SQLAlchemy engine per URL and the declarative base.

It holds the gateway's API keys and the fleet registry. SQLite (a file under ``.corral/``)
by default, PostgreSQL through ``CORRAL_DATABASE_URL``. The schema is managed by Alembic
(``app/migrations``); tables register on :class:`Base`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Every Corral table; ``Base.metadata`` is what Alembic compares migrations against."""


@lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # A fresh checkout has no .corral/ yet; SQLite would fail with "unable to open".
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # pool_pre_ping: a PostgreSQL restart must not fail the next request with a dead socket.
    return create_engine(url, pool_pre_ping=True)


def shown_url(url: str) -> str:
    """The URL with its password masked, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


def sessions(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine(url), expire_on_commit=False)


def rows_changed(result: Result[*tuple[Any, ...]]) -> int:
    """The rows an UPDATE or DELETE changed. ``Session.execute`` types its result as a Result;
    a DML statement's is a CursorResult, which counts them (SQLAlchemy documents the cast)."""
    return cast("CursorResult[*tuple[Any, ...]]", result).rowcount
