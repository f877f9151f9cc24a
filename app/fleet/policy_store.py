"""The rate-limit policy in the registry database: agent classes and the global rate.

Like instances (``app.fleet.registry``), rows belong to a namespace, and the settings seed them with
"the latest change wins": :meth:`PolicyStore.seed_from_settings` adds a class the database
lacks, replaces a row whose entry in the settings changed since it was last seeded (the file
was edited), and leaves the row alone when the entry did not change, so a change made with
``corral policy`` or the admin API survives restarts. The global rate is one row per namespace
(``global_limits``), seeded the same way from ``global_rate_per_minute``.

Classes keep the order they were created in (the settings' order, then classes added later):
an agent whose name matches several classes' patterns is in the first.

The database is what the policy should be; what is in force is in Redis (``app.policy.live``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Select, String, UniqueConstraint, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, rows_changed, sessions
from app.policy.live import Policy
from app.settings import AgentClass, Settings, check_class_name, get_settings

#: The columns that hold an ``AgentClass`` field of the same name.
FIELDS = tuple(AgentClass.model_fields)


class UnknownClass(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no agent class {name!r}; see `corral policy list`")


class AgentClassRow(Base):
    __tablename__ = "agent_classes"
    __table_args__ = (
        UniqueConstraint("namespace", "name", name="uq_agent_classes_namespace_name"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    agents: Mapped[list[str]] = mapped_column(JSON, doc="shell patterns of agent names")
    rate_per_minute: Mapped[float | None]
    agent_rate_per_minute: Mapped[float | None]
    on_limit: Mapped[str] = mapped_column(String(8), doc="wait or refuse")
    max_in_flight: Mapped[int | None]
    seeded: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True), doc="the settings' entry this row was last seeded from"
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def config(self) -> AgentClass:
        return AgentClass.model_validate({f: getattr(self, f) for f in FIELDS})

    def assign(self, config: AgentClass) -> None:
        for f in FIELDS:
            setattr(self, f, getattr(config, f))
        self.updated_at = datetime.now(UTC)


class GlobalLimitsRow(Base):
    """The limits over every agent of a namespace: one row each."""

    __tablename__ = "global_limits"
    __table_args__ = (UniqueConstraint("namespace", name="uq_global_limits_namespace"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    rate_per_minute: Mapped[float | None] = mapped_column(doc="None: no global limit")
    seeded: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True), doc="the settings' value it was last seeded from"
    )
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _rate(value: float | None) -> float | None:
    """A global rate as the policy validates it (None, or above 0)."""
    return Policy(global_rate_per_minute=value).global_rate_per_minute


class PolicyStore:
    """The policy of one namespace in the database at ``url``; each method is one short
    transaction. The schema is the registry's (``Registry.ready`` migrates and seeds both)."""

    def __init__(self, url: str | None = None, namespace: str | None = None) -> None:
        s = get_settings()
        self.url = url or s.database_url
        self.namespace = namespace or s.namespace
        self._sessions = sessions(self.url)

    def _mine(self) -> Select[AgentClassRow]:
        return select(AgentClassRow).where(AgentClassRow.namespace == self.namespace)

    def _global(self) -> Select[GlobalLimitsRow]:
        return select(GlobalLimitsRow).where(GlobalLimitsRow.namespace == self.namespace)

    def classes(self) -> dict[str, AgentClass]:
        with self._sessions() as session:
            rows = session.scalars(self._mine().order_by(AgentClassRow.id))
            return {row.name: row.config() for row in rows}

    def get(self, name: str) -> AgentClass | None:
        with self._sessions() as session:
            row = session.scalar(self._mine().where(AgentClassRow.name == name))
            return row.config() if row else None

    def global_rate(self) -> float | None:
        with self._sessions() as session:
            row = session.scalar(self._global())
            return row.rate_per_minute if row else None

    def load(self) -> Policy:
        """The whole policy, as it goes to Redis."""
        return Policy(classes=self.classes(), global_rate_per_minute=self.global_rate())

    def put(self, name: str, config: AgentClass) -> bool:
        """Create the class, or replace all of its fields; returns whether it was created."""
        check_class_name(name)
        with self._sessions.begin() as session:
            row = session.scalar(self._mine().where(AgentClassRow.name == name).with_for_update())
            if row is not None:
                row.assign(config)
                return False
        now = datetime.now(UTC)
        row = AgentClassRow(namespace=self.namespace, name=name, created_at=now)
        row.assign(config)
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:  # created meanwhile by someone else: replace theirs
            return self.put(name, config)
        return True

    def update(self, name: str, **changes: Any) -> AgentClass:
        """Change some fields of a class (validated as a whole); UnknownClass if absent."""
        with self._sessions.begin() as session:
            row = session.scalar(self._mine().where(AgentClassRow.name == name).with_for_update())
            if row is None:
                raise UnknownClass(name)
            config = AgentClass.model_validate(row.config().model_dump() | changes)
            row.assign(config)
            return config

    def remove(self, name: str) -> bool:
        with self._sessions.begin() as session:
            gone = session.execute(
                delete(AgentClassRow).where(
                    AgentClassRow.namespace == self.namespace, AgentClassRow.name == name
                )
            )
            return rows_changed(gone) > 0

    def set_global_rate(self, rate: float | None) -> float | None:
        rate = _rate(rate)
        with self._sessions.begin() as session:
            row = session.scalar(self._global().with_for_update())
            if row is not None:
                row.rate_per_minute, row.updated_at = rate, datetime.now(UTC)
                return rate
        try:
            with self._sessions.begin() as session:
                session.add(self._new_global(rate, seeded=None))
        except IntegrityError:  # created meanwhile (a process seeding): set it there
            return self.set_global_rate(rate)
        return rate

    def _new_global(self, rate: float | None, seeded: dict[str, Any] | None) -> GlobalLimitsRow:
        return GlobalLimitsRow(
            namespace=self.namespace,
            rate_per_minute=rate,
            seeded=seeded,
            updated_at=datetime.now(UTC),
        )

    def seed_from_settings(self, settings: Settings | None = None) -> list[str]:
        """Write the settings' classes (and global rate) that are new or changed since they
        were last seeded (see the module's docstring); returns their names (``*`` for the
        global rate).

        Safe when several processes seed at once: they write the same rows, and an insert
        another one made first is left as it is.
        """
        settings = settings or get_settings()
        with self._sessions() as session:
            mine = select(AgentClassRow.name, AgentClassRow.seeded).where(
                AgentClassRow.namespace == self.namespace
            )
            seeded = {name: entry for name, entry in session.execute(mine)}
            limits = session.scalar(self._global())
            # False: no row yet, which no entry equals.
            global_seeded = limits.seeded if limits is not None else False
        written = []
        for name, config in settings.agent_classes.items():
            entry = config.model_dump(mode="json")
            if name in seeded and seeded[name] == entry:
                continue
            try:
                with self._sessions.begin() as session:
                    row = session.scalar(self._mine().where(AgentClassRow.name == name))
                    if row is None:
                        row = AgentClassRow(
                            namespace=self.namespace, name=name, created_at=datetime.now(UTC)
                        )
                        session.add(row)
                    row.assign(config)
                    row.seeded = entry
            except IntegrityError:
                continue
            written.append(name)
        entry = {"rate_per_minute": settings.global_rate_per_minute}
        if global_seeded != entry:
            try:
                with self._sessions.begin() as session:
                    limits = session.scalar(self._global())
                    if limits is None:
                        session.add(self._new_global(settings.global_rate_per_minute, entry))
                    else:
                        limits.rate_per_minute = settings.global_rate_per_minute
                        limits.seeded, limits.updated_at = entry, datetime.now(UTC)
                written.append("*")
            except IntegrityError:
                pass
        return written
