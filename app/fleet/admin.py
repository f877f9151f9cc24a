"""Changes to the fleet, as ``corral fleet`` and the gateway's admin API make them.

Each change is written to the registry (the desired configuration, in the database) and
then pushed into Redis at once (the live state the routers read), so it applies without
restarting anything; the instance's worker also picks it up from its row. An instance added
without a worker is in Redis but counts as down (it has no heartbeat) until its worker
starts.

Removing an instance drains it first, then refuses while jobs hold slots on it (running,
or queued for it) unless forced: a forced removal lets the running jobs finish on the
worker and sends the ones still queued for it back through the router.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.fleet.registry import Registry, UnknownInstance
from app.settings import InstanceConfig, get_settings
from app.state.fleet import FleetState, fleet_state
from routing import InstanceStats


class FleetConflict(Exception):
    """The change cannot be made in the fleet's current state; the message says what to do."""


@dataclass(frozen=True)
class InstanceView:
    """An instance as the registry wants it and as Redis has it, either of which may lack it."""

    name: str
    config: InstanceConfig | None
    live: InstanceStats | None
    now: float

    @property
    def state(self) -> str:
        if self.live is None:
            return "no worker"  # in the registry, not in Redis: no worker registered it yet
        if not self.live.enabled:
            return "draining"
        return "up" if self.live.up(self.now) else "DOWN"

    def as_dict(self) -> dict[str, Any]:
        live = self.live
        return {
            "name": self.name,
            "state": self.state,
            "in_registry": self.config is not None,
            "config": self.config.model_dump() if self.config else None,
            "live": None
            if live is None
            else {
                "capacity": live.capacity,
                "in_flight": live.in_flight,
                "healthy": live.healthy,
                "breaker": live.breaker,
                "models": sorted(live.models),
                "loaded": sorted(live.loaded),
                "max_loaded": live.max_loaded,
                "memory": live.memory,
                "sizes": live.sizes,
                "ewma_ms": live.ewma_ms,
                "probe_ms": live.probe_ms,
                "host_cpu": live.host_cpu,
                "host_mem": live.host_mem,
                "host_pressure": live.host_pressure,
            },
        }


@dataclass(frozen=True)
class Applied:
    """A configuration written and pushed; ``capacity`` is what the routers now use."""

    config: InstanceConfig
    capacity: int

    @property
    def note(self) -> str | None:
        """Why the routers use less than the parallelism, and what to do about it."""
        if self.capacity >= self.config.parallelism:
            return None
        return (
            f"{self.config.name} takes {self.capacity} jobs at once until its worker restarts:"
            f" its worker runs {self.capacity} threads; restart it"
            f" (corral worker --instance {self.config.name}) to use parallelism"
            f" {self.config.parallelism}"
        )


class FleetAdmin:
    def __init__(self, registry: Registry, fleet: FleetState) -> None:
        self.registry, self.fleet = registry, fleet

    @classmethod
    def ready(cls) -> FleetAdmin:
        """For the configured database (migrated, seeded) and Redis namespace."""
        return cls(Registry.ready(), fleet_state())

    def views(self) -> list[InstanceView]:
        configs = {c.name: c for c in self.registry.list()}
        snap = self.fleet.instances.snapshot()
        live = {i.name: i for i in snap.instances}
        return [
            InstanceView(n, configs.get(n), live.get(n), snap.now)
            for n in sorted(configs.keys() | live.keys())
        ]

    def view(self, name: str) -> InstanceView:
        for v in self.views():
            if v.name == name:
                return v
        raise UnknownInstance(name)

    def add(self, config: InstanceConfig) -> Applied:
        self.registry.add(config)
        return Applied(config, self.fleet.instances.register(config))

    def update(self, name: str, **changes: Any) -> Applied:
        config = self.registry.update(name, **changes)
        return Applied(config, self.fleet.instances.register(config))

    def set_enabled(self, name: str, enabled: bool) -> InstanceConfig:
        """Drain (no new jobs; running ones finish) or undrain, persisted in the registry."""
        config = self.registry.update(name, enabled=enabled)
        self.fleet.instances.set_enabled(name, enabled)
        return config

    def remove(self, name: str, *, wait: float = 0.0, force: bool = False) -> int:
        """Drain the instance, wait up to ``wait`` seconds for its jobs, then remove it.

        FleetConflict if jobs still hold slots on it, unless ``force``; returns how many
        queued jobs went back through the router.
        """
        from app.jobs.stranded import requeue

        if any(i.name == name for i in get_settings().instances):
            raise FleetConflict(
                f"{name} is in the fleet file (CORRAL_CONFIG or CORRAL_INSTANCES), which would"
                " add it again at the next start: delete it there first, then remove it here"
            )
        # Drain before counting, so that no slot can be granted after the count.
        self.set_enabled(name, False)
        deadline = time.monotonic() + wait
        while (busy := self.fleet.instances.in_flight(name)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if busy and not force:
            raise FleetConflict(
                f"{name} has {busy} job(s) in flight; it is draining now (no new jobs): remove"
                " it again once they finish, wait for them (--wait SECONDS), or force it"
                " (--force: running jobs still finish, queued ones go back to the router)"
            )
        self.registry.remove(name)
        self.fleet.instances.unregister(name)
        return requeue(name) if busy else 0
