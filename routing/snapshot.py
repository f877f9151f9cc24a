"""What the router knows about the fleet at one instant."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routing.placement import Placement


@dataclass(frozen=True, slots=True)
class InstanceStats:
    name: str
    capacity: int
    in_flight: int = 0
    models: frozenset[str] = frozenset()
    loaded: frozenset[str] = frozenset()
    enabled: bool = True
    healthy: bool = True
    down_until: float = 0.0
    weight: float = 1.0
    #: Which jobs it takes: "chat" (generate and chat), "embedding" (embed) or "both".
    role: str = "both"
    ewma_ms: float = 0.0
    model_ewma_ms: dict[str, float] = field(default_factory=dict)
    load_ms: dict[str, float] = field(default_factory=dict)
    recent_errors: int = 0
    #: 0 (idle) to 1 (saturated): the load of the host the instance's worker runs on.
    host_pressure: float = 0.0
    #: That host's CPU and memory use, percent, and how long the server took to answer the
    #: last heartbeat's /api/ps, ms (shown by `corral fleet list`).
    host_cpu: float = 0.0
    host_mem: float = 0.0
    probe_ms: float = 0.0
    #: When the instance's worker stops heartbeating, it counts as down from this time.
    expires_at: float = math.inf
    #: Circuit breaker: "closed", "open" (no jobs until down_until), "half_open" (one probe).
    breaker: str = "closed"
    #: Priority level, 0-9: a job goes to the highest level with a free slot.
    priority: int = 5
    #: How many models the server holds at once (Ollama's OLLAMA_MAX_LOADED_MODELS).
    max_loaded: int = 3
    #: Bytes the server gives models (``memory_gb``): loaded models' sizes fit in it; None:
    #: the count alone limits (``routing.capacity.fits``).
    memory: float | None = None
    #: Bytes each model takes there, as the server reported: ``/api/ps`` ``size`` once loaded
    #: (weights, KV cache, buffers), else ``/api/tags`` ``size`` (the weights on disk).
    sizes: dict[str, float] = field(default_factory=dict)
    #: Models a job running there is loading, with since when (wall clock): ``loaded`` is as
    #: of the last heartbeat, this as of the job's start.
    loading: dict[str, float] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return max(self.capacity - self.in_flight, 0)

    def up(self, now: float) -> bool:
        return self.healthy and self.down_until <= now < self.expires_at

    def takes(self, kind: str | None) -> bool:
        """Whether its role lets it run a job of ``kind`` (None: any)."""
        if kind is None or self.role == "both":
            return True
        return (self.role == "embedding") == (kind == "embed")

    def service_ms(self, model: str) -> float:
        return self.model_ewma_ms.get(model) or self.ewma_ms


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    instances: tuple[InstanceStats, ...]
    now: float
    #: Strategy overrides set live: per model name, and "*" for every model.
    strategies: dict[str, str] = field(default_factory=dict)
    #: Jobs per model waiting to start (held by routers or still queued), where known.
    backlog: dict[str, int] = field(default_factory=dict)
    #: Of those, the urgent ones (interactive, or aged past their tier's head start).
    urgent: dict[str, int] = field(default_factory=dict)
    #: Which models each instance should hold (``routing.placement``); None: no plan.
    placement: Placement | None = None

    def strategy_for(self, model: str, default: str) -> str:
        return self.strategies.get(model) or self.strategies.get("*") or default

    def serving(self, model: str) -> list[InstanceStats]:
        return [i for i in self.instances if model in i.models and i.enabled]
