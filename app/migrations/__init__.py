"""Corral's database schema, managed by Alembic; runnable from code (gateway start,
``corral db upgrade``), so no ``alembic.ini`` is needed.

A new table: declare it on ``app.gateway.db.Base``, import its module in ``env.py``, and add
a revision under ``versions/`` (``down_revision`` = the current head).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from app.gateway.db import engine

HERE = Path(__file__).resolve().parent


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision``; a no-op when it is already there."""
    config = alembic_config()
    with engine(url).begin() as connection:
        # Handing env.py the connection keeps the URL (and its password) out of Alembic's
        # config, whose interpolation would also choke on a '%' in it.
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
