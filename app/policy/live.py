"""The live rate-limit policy: the agent classes and the global rate, as every process uses them.

Three places hold it, each for a reason:

* the registry database (``app.fleet.policy_store``) is what the policy *should* be: seeded from the
  settings' ``agent_classes`` and ``global_rate_per_minute`` (the latest change wins, as for
  instances), changed with ``corral policy`` or the admin API;
* Redis (``<ns>:policy``, one JSON value) is the policy *in force*: what :func:`live_policy`
  reads, so every process (clients, routers, gateways) agrees without reaching the database;
* this process, for :data:`READ_TTL` seconds: ``infer.delay()`` and the routers look the
  policy up for every job, and must not ask Redis each time.

A change is written to the database, then pushed here (``app.fleet.policy_admin``), so it applies
everywhere within ``READ_TTL``. A row edited in the database by any other means applies within
a heartbeat: every instance worker (the processes that reach the database) runs
:func:`refresh` each heartbeat, and one of them per heartbeat (whichever takes the turn in
Redis) pushes the database's policy unless Redis has it already. Until a policy is in Redis
(a fresh stack before its first worker started), the settings are the policy. The value and
the turn are the state layer's (``fleet_state().policy``, :mod:`app.state.policy`); this
module parses, caches and logs.
"""

from __future__ import annotations

import logging
import time
from fnmatch import fnmatchcase
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.settings import AgentClass, Settings, get_settings
from app.state import keys
from app.state.fleet import fleet_state

log = logging.getLogger(__name__)

#: Seconds a process reuses the policy it read from Redis: how long a change takes to apply.
READ_TTL = 1.0


class Policy(BaseModel):
    """Who is in which agent class, each class's limits, and the global rate (README "Rate
    limits"). The classes keep their order: an agent matching several is in the first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: dict[str, AgentClass] = Field(default_factory=dict)
    global_rate_per_minute: float | None = Field(
        None, gt=0, description="jobs a minute started across every agent; None = no limit"
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            classes=settings.agent_classes,
            global_rate_per_minute=settings.global_rate_per_minute,
        )

    def class_of(self, agent: str | None, declared: str | None = None) -> str:
        """The agent class of a job: the one it declares (an API key's), else the first class
        whose ``agents`` patterns match its agent, else ``default``."""
        if declared:
            return declared
        for name, agent_class in self.classes.items():
            if agent and any(fnmatchcase(agent, p) for p in agent_class.agents):
                return name
        return "default"

    def class_limits(
        self, agent: str | None, declared: str | None = None
    ) -> tuple[str, AgentClass | None]:
        """The job's agent class (see :meth:`class_of`) and that class's limits, if any."""
        name = self.class_of(agent, declared)
        return name, self.classes.get(name)


def policy_key(namespace: str) -> str:
    return keys.policy(namespace)


#: Per (Redis URL, key): when this process last read the policy, and what Redis held then
#: (None: nothing, so the settings apply).
_read: dict[tuple[str, str], tuple[float, Policy | None]] = {}
#: The settings' policy, built once per settings object.
_from_settings: tuple[Settings, Policy] | None = None


def _settings_policy(settings: Settings) -> Policy:
    global _from_settings
    if _from_settings is None or _from_settings[0] is not settings:
        _from_settings = (settings, Policy.from_settings(settings))
    return _from_settings[1]


def live_policy(settings: Settings | None = None, *, fresh: bool = False) -> Policy:
    """The policy in force: Redis's, reread at most every ``READ_TTL`` seconds unless
    ``fresh``; the settings' while Redis has none (or holds one that does not validate)."""
    settings = settings or get_settings()
    cache = (settings.redis_url, policy_key(settings.namespace))
    read_at, found = _read.get(cache, (-READ_TTL, None))
    if fresh or time.monotonic() - read_at > READ_TTL:
        raw = fleet_state(settings.namespace, redis_url=settings.redis_url).policy.get()
        found = _parse(raw, cache[1])
        _read[cache] = (time.monotonic(), found)
    return found if found is not None else _settings_policy(settings)


def _parse(raw: str | bytes | None, key: str) -> Policy | None:
    if raw is None:
        return None
    try:
        return Policy.model_validate_json(raw)
    except ValidationError as exc:
        # Only a hand-made value can be invalid: jobs go on under the settings meanwhile.
        log.error("the policy in Redis (%s) is invalid, the settings apply: %s", key, exc)
        return None


def publish(policy: Policy, namespace: str | None = None) -> bool:
    """Put ``policy`` in force for the namespace (default: the configured one); returns
    whether it differs from what Redis held. This process sees it at once, the others
    within ``READ_TTL``."""
    s = get_settings()
    state = fleet_state(namespace or s.namespace).policy
    changed = state.set(policy.model_dump_json())
    _read[(s.redis_url, state.key)] = (time.monotonic(), policy)
    return changed


def published(namespace: str | None = None) -> bool:
    """Whether Redis holds a policy for the namespace (default: the configured one)."""
    return fleet_state(namespace).policy.exists()


class PolicySource(Protocol):
    """Where the policy that should be in force is kept (``app.fleet.policy_store``)."""

    @property
    def namespace(self) -> str: ...

    def load(self) -> Policy: ...


def refresh(store: PolicySource) -> bool:
    """This heartbeat's re-push of the database's policy, unless another process took the
    turn; returns whether Redis changed (a row edited in the database behind the CLI's and
    the API's back)."""
    s = get_settings()
    state = fleet_state(store.namespace).policy
    if not state.take_refresh_turn(s.heartbeat_interval):
        return False
    loaded: list[Policy] = []

    def database_policy() -> str:
        # Read once the value in force is watched: a change pushed meanwhile (corral policy)
        # is newer than what this read may have seen, and is not overwritten.
        try:
            loaded.append(store.load())
        except Exception:
            state.give_back_refresh_turn()  # another process may reach the database this heartbeat
            raise
        return loaded[0].model_dump_json()

    if not state.set_if_unchanged(database_policy):
        return False
    _read.pop((s.redis_url, state.key), None)
    log.info("policy from the database now in force: %s", describe(loaded[0]))
    return True


def describe(policy: Policy) -> str:
    """One line for logs: the global rate and each class's limits."""
    rate = policy.global_rate_per_minute
    parts = [f"global {f'{rate:g}/min' if rate else 'unlimited'}"]
    for name, c in policy.classes.items():
        limits = {
            "rate": c.rate_per_minute,
            "agent_rate": c.agent_rate_per_minute,
            "max_in_flight": c.max_in_flight,
        }
        shown = ", ".join(f"{k} {v:g}" for k, v in limits.items() if v is not None)
        parts.append(
            f"{name} ({', '.join(c.agents) or 'no agents'}; {shown or 'no limits'}; {c.on_limit})"
        )
    return "; ".join(parts)
