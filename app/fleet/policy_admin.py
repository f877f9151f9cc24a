"""Changes to the rate-limit policy, as ``corral policy`` and the gateway's admin API make them.

Each change is written to the database (``app.fleet.policy_store``) and then the whole policy is
pushed into Redis (``app.policy.live``), so every process applies it within a second, without a
restart. A class listed in the settings file cannot be removed here: the next start would
seed it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.fleet.policy_store import PolicyStore, UnknownClass
from app.policy.live import Policy, live_policy, publish
from app.settings import AgentClass, check_class_name, get_settings


class PolicyConflict(Exception):
    """The change cannot be made as things are; the message says what to do."""


def reason(exc: ValueError) -> str:
    """A refused value in one line: pydantic's errors as ``field: problem``."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)


@dataclass(frozen=True)
class ClassView:
    """A class as the database has it, and whether Redis (the policy in force) agrees."""

    name: str
    config: AgentClass
    #: In the settings file (``agent_classes``), which seeds it.
    in_file: bool
    #: The class as in force now; None if Redis does not have it (yet).
    live: AgentClass | None

    @property
    def applied(self) -> bool:
        return self.live == self.config

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config.model_dump(),
            "in_file": self.in_file,
            "applied": self.applied,
        }


class PolicyAdmin:
    def __init__(self, store: PolicyStore) -> None:
        self.store = store

    @classmethod
    def ready(cls) -> PolicyAdmin:
        """For the configured database (migrated, seeded) and Redis namespace."""
        from app.fleet.registry import Registry

        Registry.ready()
        return cls(PolicyStore())

    def _push(self) -> Policy:
        policy = self.store.load()
        publish(policy, self.store.namespace)
        return policy

    def live(self) -> Policy:
        """The policy in force (Redis's, or the settings' while Redis has none)."""
        return live_policy(fresh=True)

    def views(self) -> list[ClassView]:
        in_file, live = get_settings().agent_classes, self.live().classes
        return [
            ClassView(name, config, name in in_file, live.get(name))
            for name, config in self.store.classes().items()
        ]

    def view(self, name: str) -> ClassView:
        config = self.store.get(name)
        if config is None:
            raise UnknownClass(name)
        live = self.live().classes.get(name)
        return ClassView(name, config, name in get_settings().agent_classes, live)

    def put(self, name: str, config: AgentClass) -> bool:
        """Create the class or replace every field of it; returns whether it was created."""
        created = self.store.put(name, config)
        self._push()
        return created

    def set(self, name: str, **fields: Any) -> tuple[AgentClass, bool]:
        """Change the fields given, or create the class with them (and defaults for the
        rest); returns the class and whether it was created."""
        try:
            config = self.store.update(name, **fields)
            created = False
        except UnknownClass:
            check_class_name(name)
            config = AgentClass.model_validate(fields)
            created = self.store.put(name, config)
        self._push()
        return config, created

    def update(self, name: str, **changes: Any) -> AgentClass:
        """Change the fields given; UnknownClass if there is no such class."""
        config = self.store.update(name, **changes)
        self._push()
        return config

    def remove(self, name: str) -> None:
        if name in get_settings().agent_classes:
            raise PolicyConflict(
                f"agent class {name!r} is in the settings file (CORRAL_CONFIG or"
                " CORRAL_AGENT_CLASSES), which would add it again at the next start: delete it"
                f" there first, or lift its limits here (corral policy set {name}"
                " --rate-per-minute none ...)"
            )
        if not self.store.remove(name):
            raise UnknownClass(name)
        self._push()

    def global_rate(self) -> float | None:
        return self.store.global_rate()

    def set_global_rate(self, rate: float | None) -> float | None:
        """None lifts the global limit."""
        rate = self.store.set_global_rate(rate)
        self._push()
        return rate
