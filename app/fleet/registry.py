"""The fleet registry: every instance's desired configuration, in the database.

The registry is what the fleet *should* be; Redis (``app.state.fleet``) is what it *is*, and
is all the routers ever read. ``app.fleet.admin`` writes a change here and then pushes it into
Redis; an instance worker re-reads its own row every few heartbeats, so a row edited any
other way also applies without a restart.

Rows belong to a namespace (the ``namespace`` setting), like every Redis key and queue, so
stacks that share a database (a benchmark, a test session) keep separate fleets.

The ``instances`` of the settings (the fleet file) seed the registry, and the latest change
wins: :meth:`Registry.seed_from_settings` adds an entry the registry lacks, replaces a row
whose file entry changed since it was last seeded (the file was edited), and leaves the row
alone when the entry did not change, so changes made through ``corral fleet`` or the admin
API survive restarts. The same database holds the rate-limit policy (``app.fleet.policy_store``),
seeded along with the instances.
"""

from __future__ import annotations

import builtins
import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from redis import RedisError
from sqlalchemy import JSON, DateTime, Select, String, UniqueConstraint, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, rows_changed, sessions

# Also registers the policy's tables, for Alembic (migrations/env.py imports this module).
from app.fleet.policy_store import PolicyStore
from app.policy.live import publish, published
from app.settings import InstanceConfig, Settings, get_settings

log = logging.getLogger(__name__)

#: The columns that hold an ``InstanceConfig`` field of the same name.
FIELDS = tuple(InstanceConfig.model_fields)


class UnknownInstance(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no instance {name!r} in the registry; see `corral fleet list`")


class InstanceExists(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"instance {name!r} is already in the registry; change it with"
            f" `corral fleet update {name} ...` (or PATCH /admin/instances/{name})"
        )


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("namespace", "name", name="uq_instances_namespace_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(512))
    parallelism: Mapped[int]
    max_loaded_models: Mapped[int] = mapped_column(server_default="3")
    memory_gb: Mapped[float | None] = mapped_column(doc="None: max_loaded_models alone")
    weight: Mapped[float]
    models: Mapped[list[str] | None] = mapped_column(
        JSON(none_as_null=True), doc="None: discovered from /api/tags"
    )
    role: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int]
    request_timeout: Mapped[float | None]
    retry_attempts: Mapped[int | None]
    rate_limit_per_minute: Mapped[int | None]
    enabled: Mapped[bool] = mapped_column(doc="False: draining")
    tags: Mapped[list[str]] = mapped_column(JSON)
    seeded: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True), doc="the fleet file's entry this row was last seeded from"
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def config(self) -> InstanceConfig:
        return InstanceConfig.model_validate({f: getattr(self, f) for f in FIELDS})

    def assign(self, config: InstanceConfig) -> None:
        for f in FIELDS:
            setattr(self, f, getattr(config, f))
        self.updated_at = datetime.now(UTC)


class Registry:
    """The instances of one namespace in the database at ``url``; each method is one short
    transaction."""

    def __init__(self, url: str | None = None, namespace: str | None = None) -> None:
        s = get_settings()
        self.url = url or s.database_url
        self.namespace = namespace or s.namespace
        self._sessions = sessions(self.url)

    @classmethod
    def ready(cls, url: str | None = None, namespace: str | None = None) -> Registry:
        """A registry whose schema is up to date and which holds the settings' instances and
        agent classes (see :meth:`seed_policy`)."""
        registry = cls(url, namespace)
        registry.migrate()
        registry.seed_from_settings()
        registry.seed_policy()
        return registry

    def policy(self) -> PolicyStore:
        """The rate-limit policy, kept in the same database and namespace."""
        return PolicyStore(self.url, self.namespace)

    def seed_policy(self) -> None:
        """Seed the rate-limit policy from the settings, and put it in force (Redis) when that
        changed it or Redis has none yet; else the instance workers' re-push keeps Redis in
        step with the database (``app.policy.live``)."""
        store = self.policy()
        written = store.seed_from_settings()
        try:
            if written or not published(self.namespace):
                publish(store.load(), self.namespace)
        except RedisError as exc:  # not this process's job to fail for: the re-push retries
            log.warning("the policy goes into Redis at the workers' next heartbeat: %s", exc)

    def migrate(self) -> None:
        from app.migrations import upgrade

        upgrade(self.url)

    def _mine(self) -> Select[Instance]:
        return select(Instance).where(Instance.namespace == self.namespace)

    def list(self) -> list[InstanceConfig]:
        with self._sessions() as session:
            return [row.config() for row in session.scalars(self._mine().order_by(Instance.name))]

    def get(self, name: str) -> InstanceConfig | None:
        with self._sessions() as session:
            row = session.scalar(self._mine().where(Instance.name == name))
            return row.config() if row else None

    def add(self, config: InstanceConfig) -> InstanceConfig:
        """Insert a new instance; InstanceExists if the name is taken."""
        now = datetime.now(UTC)
        row = Instance(namespace=self.namespace, name=config.name, created_at=now)
        row.assign(config)
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            raise InstanceExists(config.name) from None
        return config

    def update(self, name: str, **changes: Any) -> InstanceConfig:
        """Change some fields of an instance (validated as a whole); UnknownInstance if absent.

        The name cannot change: remove the instance and add it under the new name.
        """
        if changes.get("name", name) != name:
            raise ValueError("an instance cannot be renamed: remove it and add it again")
        with self._sessions.begin() as session:
            row = session.scalar(self._mine().where(Instance.name == name).with_for_update())
            if row is None:
                raise UnknownInstance(name)
            config = InstanceConfig.model_validate(row.config().model_dump() | changes)
            row.assign(config)
            return config

    def upsert(self, name: str, **fields: Any) -> InstanceConfig:
        """Change the fields given, or add the instance with them (a worker registering its
        own server: ``corral worker --ollama URL``)."""
        try:
            return self.update(name, **fields)
        except UnknownInstance:
            return self.add(InstanceConfig(name=name, **fields))

    def remove(self, name: str) -> bool:
        with self._sessions.begin() as session:
            gone = session.execute(
                delete(Instance).where(Instance.namespace == self.namespace, Instance.name == name)
            )
            return rows_changed(gone) > 0

    # builtins.list: ``list`` in this class is the method above.
    def seed_from_settings(self, settings: Settings | None = None) -> builtins.list[str]:
        """Write the settings' instances that are new or changed since they were last
        seeded (see the module's docstring); returns their names.

        Safe when several processes seed at once (workers starting together): they write
        the same rows, and an insert another one made first is left as it is.
        """
        with self._sessions() as session:
            mine = select(Instance.name, Instance.seeded).where(
                Instance.namespace == self.namespace
            )
            seeded = {name: entry for name, entry in session.execute(mine)}
        written = []
        for config in (settings or get_settings()).instances:
            entry = config.model_dump(mode="json")
            if config.name in seeded and _as_now(seeded[config.name]) == entry:
                continue
            try:
                with self._sessions.begin() as session:
                    row = session.scalar(self._mine().where(Instance.name == config.name))
                    if row is None:
                        row = Instance(namespace=self.namespace, created_at=datetime.now(UTC))
                        session.add(row)
                    row.assign(config)
                    row.seeded = entry
            except IntegrityError:
                continue
            written.append(config.name)
        return written


def _as_now(seeded: object) -> object:
    """A seeded entry as today's settings read it: a field added since (with its default)
    is not a change, so an upgrade does not re-seed rows over ``corral fleet``'s edits."""
    try:
        return InstanceConfig.model_validate(seeded).model_dump(mode="json")
    except ValidationError:
        return seeded  # no longer valid: the file's entry differs, and is written
