"""Corral's database: one SQLAlchemy engine per URL and the declarative base.

It holds the gateway's API keys and the fleet registry. SQLite (a file under ``.corral/``)
by default, PostgreSQL through ``CORRAL_DATABASE_URL``. The schema is managed by Alembic
(``app/migrations``); tables register on :class:`Base`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import DeclarativeBase, sessionmaker


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


def sessions(url: str) -> sessionmaker:
    return sessionmaker(engine(url), expire_on_commit=False)
