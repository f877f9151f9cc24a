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
from sqlalchemy import Connection, make_url, text

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
    # The file lock is held until the transaction has committed: released any earlier, the
    # next process would read the schema version from before this upgrade and run it again
    # ("table ... already exists").
    with _file_lock(url), engine(url).begin() as connection, _advisory_lock(connection):
        # Handing env.py the connection keeps the URL (and its password) out of Alembic's
        # config, whose interpolation would also choke on a '%' in it.
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


@contextmanager
def _advisory_lock(connection: Connection) -> Iterator[None]:
    """PostgreSQL: one migration at a time per database, released when the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    yield


@contextmanager
def _file_lock(url: str) -> Iterator[None]:
    """SQLite: one migration at a time per database file, through a lock file beside it."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or database in (None, "", ":memory:"):
        yield
        return
    engine(url)  # creates the file's folder, as for the database itself
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
