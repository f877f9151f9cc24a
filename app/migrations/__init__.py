"""Corral's database schema, managed by Alembic; runnable from code (gateway start, instance
worker start, ``corral db upgrade``), so no ``alembic.ini`` is needed.

A new table: declare it on ``app.db.Base``, import its module in ``env.py``, and add a
revision under ``versions/`` (``down_revision`` = the current head).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from app.db import engine

HERE = Path(__file__).resolve().parent
#: Any constant: the key of the PostgreSQL advisory lock that serialises migrations.
PG_LOCK_KEY = 0x636F7272616C  # "corral"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision``; a no-op when it is already there.

    Safe when several processes do it at once (instance workers starting together): they
    take turns, and the later ones find the schema already there.
    """
    config = alembic_config()
    with engine(url).begin() as connection, _exclusive(connection):
        # Handing env.py the connection keeps the URL (and its password) out of Alembic's
        # config, whose interpolation would also choke on a '%' in it.
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


@contextmanager
def _exclusive(connection: Connection) -> Iterator[None]:
    """One migration at a time per database."""
    if connection.dialect.name == "postgresql":
        # Released when the transaction ends.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        yield
        return
    database = connection.engine.url.database
    if connection.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        yield
        return
    # SQLite runs DDL outside transactions: a lock file next to the database serialises.
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
