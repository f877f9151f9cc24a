"""Everything one simulated server knows: catalogue, scheduler, counters, fault knobs."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import FaultKnobs, SimInstance, SimModel
from .protocol import Clock
from .scheduler import Scheduler
from .stats import Stats


class SimState:
    def __init__(self, instance: SimInstance) -> None:
        self.cfg = instance
        self.stats = Stats()
        self.scheduler = Scheduler(instance, self.stats)
        self.catalog: dict[str, SimModel] = {m.name: m for m in instance.models}
        now = time.time()
        self.added_at: dict[str, float] = dict.fromkeys(self.catalog, now)
        self.rng = random.Random(instance.seed)
        self.clock = Clock()
        # Hung requests wait on this event, so turning `hang` off releases them.
        self.unhung = asyncio.Event()
        if not instance.hang:
            self.unhung.set()
        self.refuse: Callable[[float], Awaitable[None]] | None = None
        """Set by the fleet runner, which owns the listening socket."""

    def roll(self, rate: float) -> bool:
        """True with probability ``rate``; draws no random number for the common rate 0."""
        return rate > 0 and (rate >= 1 or self.rng.random() < rate)

    def add_model(self, model: SimModel) -> None:
        self.catalog[model.name] = model
        self.added_at[model.name] = time.time()

    def remove_model(self, name: str) -> None:
        del self.catalog[name]
        del self.added_at[name]
        self.scheduler.unload(name)

    def update_faults(self, update: dict[str, Any]) -> dict[str, object]:
        """Validate ``update`` like the config file would, then apply it to the live server."""
        knobs = FaultKnobs.model_validate({**self.cfg.faults(), **update})
        for name in FaultKnobs.model_fields:
            setattr(self.cfg, name, getattr(knobs, name))
        if "seed" in update:
            self.rng.seed(knobs.seed)
        if knobs.hang:
            self.unhung.clear()
        else:
            self.unhung.set()
        return self.cfg.faults()
