"""Degradation levels: how the fleet orders and admits work when it cannot keep up.

The rule every level follows: **a free slot always goes to the best waiting job that may use
it.** A level may change which job is best, and may refuse *new* jobs at the door; it never
holds an admitted job while a slot that could run it is free. Holding admitted work can only
idle slots: the backlog it keeps is what raised the level, so the level would never fall.

==  =========  =============================================================================
0   normal     waiting jobs are ordered by virtual deadline: a batch job that has waited its
               tier's head start competes as if it were interactive (aging)
1   shed_batch batch jobs yield: they take only slots no interactive or normal job waits for
2   essential  normal jobs yield to interactive ones too (batch still yields to both)
3   refuse     as 2, and new normal jobs are refused at the call (``Overloaded``: "retry
               after N s"; the gateway answers 503 with Retry-After)
==  =========  =============================================================================

So the levels add what the tiers alone do not: at level 0 aging lets old batch work catch
up with interactive work, which is fair when the fleet keeps up; under overload (1, 2) the
protected tiers take precedence outright, and at 3 the door closes to new normal work, whose
callers wait for an answer and are better told at once to come back later. Batch jobs are
still taken at every level: they are meant to wait, they yield to everything else, and the
broker is where a backlog belongs; so a batch backlog alone, however deep, raises no level.
The response cache answers repeated requests at every level before they wait at all.

The level follows two signals: the urgent backlog (interactive and normal jobs waiting to
start, held by routers or still queued, per slot of the fleet) and the interactive wait (a
moving average of how long interactive jobs waited for their slot). It rises as soon as
either crosses a threshold and falls one level at a time, once the signals have stayed below
it for ``degradation_hold`` seconds, so it neither flaps nor stays up after the load is gone.
One router evaluates it per heartbeat (whichever takes the turn in Redis); every process
reads it from Redis, at most once a second. An operator can pin a level (``corral degrade
--level N``) until released. The hash and the turn are the state layer's
(``fleet_state().degradation``, :mod:`app.state.degradation`); this module holds the rules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from app.settings import TIERS, Tier, get_settings
from app.state.fleet import fleet_state

log = logging.getLogger(__name__)

NAMES = ("normal", "shed_batch", "essential", "refuse")
#: The level at which new normal and batch jobs are refused at the call.
REFUSE_LEVEL = 3
#: The lowest level from which each tier yields to the more urgent ones (interactive never).
YIELDS_FROM: dict[Tier, int] = {"interactive": 99, "normal": 2, "batch": 1}
#: How far behind every waiter of a more urgent tier a yielding tier's waiters sort, in the
#: seconds of a virtual deadline (about four months: further than any job waits).
YIELD_BAND_S = 1e7
#: Weight of the newest interactive wait in its moving average.
WAIT_ALPHA = 0.2
#: Seconds a process reuses the level it read.
READ_TTL = 1.0


@dataclass(frozen=True)
class Signals:
    #: Interactive and normal jobs waiting to start, per slot of the fleet.
    urgent_per_slot: float
    #: Moving average of interactive jobs' wait for a slot (0 when none started lately).
    interactive_wait_s: float


def target_level(signals: Signals) -> tuple[int, str]:
    """The level the signals call for, and why (pure).

    Every level follows the urgent backlog (the work they protect) and the interactive wait.
    """
    s = get_settings()
    backlog = signals.urgent_per_slot
    level, reason = 0, "load is normal"
    for i, (jobs, wait) in enumerate(
        zip(s.degradation_backlog_per_slot, s.degradation_interactive_wait_s, strict=True)
    ):
        if backlog >= jobs:
            level, reason = i + 1, f"{backlog:.1f} jobs waiting per slot (threshold {jobs:g})"
        elif signals.interactive_wait_s >= wait:
            level, reason = i + 1, f"interactive jobs wait {signals.interactive_wait_s:.1f} s"
    return level, reason


def yield_band(tier: Tier, level: int) -> float:
    """What ``level`` adds to a waiting job's virtual deadline (pure): 0 while its tier does
    not yield, else a band per tier, so that batch sorts behind normal behind interactive."""
    if level < YIELDS_FROM[tier]:
        return 0.0
    return YIELD_BAND_S * TIERS.index(tier)


def next_level(current: int, calm_since: float | None, target: int, now: float) -> int:
    """Up at once; down one step once the target stayed lower for ``degradation_hold`` (pure)."""
    if target >= current:
        return target
    if calm_since is not None and now - calm_since >= get_settings().degradation_hold:
        return current - 1
    return current


#: Per Redis key: when this process last read the level, and what it was.
_read: dict[str, tuple[float, int]] = {}


class Degradation:
    """The fleet's level: the rules over its hash in Redis (``app.state.degradation``)."""

    def __init__(self) -> None:
        self.state = fleet_state().degradation
        self.key = self.state.key

    def level(self, fresh: bool = False) -> int:
        """The level in force (reread at most every ``READ_TTL`` seconds unless ``fresh``)."""
        read_at, level = _read.get(self.key, (-READ_TTL, 0))
        if fresh or time.monotonic() - read_at > READ_TTL:
            level = self.state.level()
            _read[self.key] = (time.monotonic(), level)
        return level

    def record_wait(self, tier: Tier, wait_s: float) -> None:
        """An interactive job started after waiting ``wait_s``: feed the moving average."""
        if tier != "interactive":
            return
        self.state.record_wait(wait_s, alpha=WAIT_ALPHA)

    def stored(self) -> dict[str, str]:
        """The level's hash as stored: level, reason, override, the interactive wait..."""
        return self.state.stored()

    def pin(self, level: int | None) -> None:
        """Hold the fleet at ``level`` (an operator's choice), or give it back to the signals."""
        self.state.pin(level)
        _read.pop(self.key, None)

    def evaluate(self, now: float | None = None) -> int:
        """Recompute the level from the signals, unless another router did this heartbeat."""
        s = get_settings()
        now = now or time.time()
        if not self.state.take_turn(s.heartbeat_interval):
            return self.level()
        signals = self.signals()
        target, reason = target_level(signals)
        current, calm_since = self.state.evaluated()
        if target < current and calm_since is None:
            calm_since = now
        elif target >= current:
            calm_since = None
        new = next_level(current, calm_since, target, now)
        if new != current:
            log.warning("degradation %s -> %s (%s)", NAMES[current], NAMES[new], reason)
            calm_since = None
        self.state.write(new, reason, calm_since)
        return new

    def signals(self) -> Signals:
        from app.queues import queue_counts, route_queue

        fleet = fleet_state()
        snapshot = fleet.instances.snapshot()
        slots = sum(i.capacity for i in snapshot.instances if i.up(snapshot.now)) or 1
        models = fleet.instances.served_models()
        waiting = sum(fleet.slots.waiting(m) for m in models)
        counts = queue_counts([route_queue(m, t) for m in models for t in TIERS])
        queued = {t: sum(counts[route_queue(m, t)][0] for m in models) for t in TIERS}
        wait, at = self.state.interactive_wait()
        recent = at is not None and time.time() - at < WAIT_MEMORY_S
        return Signals(
            urgent_per_slot=(waiting + queued["interactive"] + queued["normal"]) / slots,
            interactive_wait_s=wait if recent else 0.0,
        )


#: Seconds an interactive wait counts after the last interactive job started.
WAIT_MEMORY_S = 60.0


def degradation() -> Degradation:
    return Degradation()
