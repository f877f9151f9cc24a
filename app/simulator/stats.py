"""Counters that let tests prove a router never oversubscribes a server.

``in_flight`` counts inference requests anywhere inside the server (scheduler queue, load,
slot queue, generation); ``active`` counts those holding a slot.  A router that respects
``num_parallel`` keeps ``peak_in_flight`` at or below the slot count. Model-management calls
(an empty-prompt preload, a ``keep_alive: 0`` unload) are not inference: Ollama serves them
without a slot, and they count in ``requests_total`` and ``managed_total`` only.

``cancelled_total`` counts requests whose client disconnected before the answer was complete
(the server then stops working on them, as Ollama does), ``last_cancelled_at`` is the wall
time of the latest, and ``busy_seconds`` adds up the time slots were held: with cancellations
it shows how much generation nobody waited for.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

#: Slot spans kept for ``/sim/spans``: enough for the longest load test, bounded.
MAX_SPANS = 100_000


@dataclass
class ModelStats:
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    active: int = 0
    peak_active: int = 0
    loads: int = 0
    evictions: int = 0


class Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.peak_in_flight = 0
        self.active = 0
        self.peak_active = 0
        self.requests_total = 0
        self.managed_total = 0
        self.errors_total = 0
        self.rejected_total = 0
        self.cancelled_total = 0
        self.last_cancelled_at = 0.0
        self.busy_seconds = 0.0
        self.loads_total = 0
        self.evictions_total = 0
        self.models: dict[str, ModelStats] = {}
        #: (taken, freed) wall-clock times of each request that held a slot: what the
        #: benchmarks and load tests derive idle slot-time and slot gaps from.
        self.spans: deque[tuple[float, float]] = deque(maxlen=MAX_SPANS)
        #: (kind, model, start, end) of each load, unload and slot held, in wall-clock
        #: seconds: the timeline the placement benchmark draws where its time went from.
        self.events: deque[tuple[str, str, float, float]] = deque(maxlen=MAX_SPANS)

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def enter(self) -> None:
        """An inference request is inside the server (see the module's docstring)."""
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def leave(self) -> None:
        self.in_flight -= 1

    def slot_taken(self, model: ModelStats) -> None:
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        model.active += 1
        model.peak_active = max(model.peak_active, model.active)

    def slot_freed(self, model: ModelStats, held_s: float = 0.0) -> None:
        self.active -= 1
        model.active -= 1
        self.busy_seconds += held_s

    def cancelled(self) -> None:
        self.cancelled_total += 1
        self.last_cancelled_at = time.time()

    def span(self, taken: float, freed: float) -> None:
        self.spans.append((round(taken, 6), round(freed, 6)))

    def event(self, kind: str, model: str, start: float, end: float | None = None) -> None:
        """A ``load``, an ``unload`` or a ``slot`` held, for ``/sim/events``."""
        self.events.append((kind, model, round(start, 6), round(start if end is None else end, 6)))

    def reset(self) -> None:
        """Zero the counters; peaks restart from what is running now (0 when idle)."""
        self.peak_in_flight = self.in_flight
        self.peak_active = self.active
        self.requests_total = self.managed_total = self.errors_total = self.rejected_total = 0
        self.cancelled_total = self.loads_total = self.evictions_total = 0
        self.spans.clear()
        self.events.clear()
        self.last_cancelled_at = self.busy_seconds = 0.0
        for model in self.models.values():
            model.requests = model.errors = model.loads = model.evictions = 0
            model.peak_active = model.active

    def snapshot(self) -> dict[str, object]:
        return {
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "active": self.active,
            "peak_active": self.peak_active,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "rejected_total": self.rejected_total,
            "managed_total": self.managed_total,
            "cancelled_total": self.cancelled_total,
            "last_cancelled_at": self.last_cancelled_at,
            "busy_seconds": round(self.busy_seconds, 6),
            "loads_total": self.loads_total,
            "evictions_total": self.evictions_total,
            "models": {name: asdict(m) for name, m in sorted(self.models.items())},
        }
