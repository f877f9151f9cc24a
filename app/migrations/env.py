"""Alembic environment: run migrations on the connection ``app.migrations.upgrade`` passes."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

# Importing a module registers its tables on Base.metadata.
from app.db import Base, engine
from app.settings import get_settings

connection = context.config.attributes.get("connection")


def run(conn: Connection) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `corral db upgrade`")
if connection is not None:
    run(connection)
else:  # command.revision(alembic_config(), autogenerate=True): compare with the configured DB
    with engine(get_settings().database_url).begin() as conn:
        run(conn)
