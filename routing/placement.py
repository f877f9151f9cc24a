"""Which models each instance should hold: the placement plan (issue 16).

An Ollama server holds at most ``max_loaded_models`` models at once; a request for another one
waits inside it until a loaded model's running requests end, then the server evicts that model
and loads the new one. Sent job by job to whichever box has a free slot, two models that share
a fleet of one-model boxes make every box swap model for nearly every job. :func:`plan` decides
instead which models each box should hold, from the fleet and the backlog per model, and the
routers only send a job to a box that holds its model, or that the plan is switching to it, or
that has room to load it without evicting anything (:meth:`Placement.allows`).

The rules:

* a box keeps a model while that model has work, up to the boxes that work can keep busy
  (``ceil(backlog / parallelism)``), or that the plan switched to it less than ``settle_s``
  ago and has not seen loaded yet;
* a model with work and no box gets one: a box with room, else one holding only models
  without work, else (when another model holds two boxes or more, or this model has urgent
  jobs) a box taken from the model that holds the most boxes;
* a box is switched to a model only when the switch pays for itself: the boxes that hold the
  model would take longer than the model's load time to get through its backlog, so the box
  that switches then takes a batch of the new model's jobs, not one;
* urgent jobs (interactive, or batch jobs aged past their tier's head start) for a model that
  is loaded nowhere take a box at once: they wait about one load time;
* room on a box (fewer models than it can hold) lets any model in, and a router that sends a
  job into it records that (:meth:`Placement.with_arrival`): the room is taken and the model
  placed there, so the room is not given again to other models, each evicting the last,
  during the seconds before the instance reports what it loaded.

No I/O: the backlog per model (``FleetSnapshot.backlog`` and ``urgent``), each instance's loaded
models and ``max_loaded`` come in the snapshot, and the plan of the previous call comes in as
``previous`` (a switch is not visible in ``loaded`` until the instance's next heartbeat, so the
plan remembers the switches it decided for ``settle_s`` seconds).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from routing.snapshot import FleetSnapshot, InstanceStats

#: Load and service times assumed where nothing was learned (as ``routing.ranking``).
DEFAULT_LOAD_MS = 5_000.0
UNKNOWN_SERVICE_MS = 1_000.0


@dataclass(frozen=True, slots=True)
class Placement:
    #: Per instance: the models it should hold (loaded and kept, or being loaded).
    hold: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Per instance: how many more models it can load without evicting one it should hold.
    room: dict[str, int] = field(default_factory=dict)
    #: Per instance: the models the plan switched it to, not reported loaded yet, and when.
    arriving: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Per model: when it last had a backlog.
    wanted: dict[str, float] = field(default_factory=dict)

    def allows(self, instance: str, model: str) -> bool:
        """Whether a job of ``model`` may take a slot on ``instance``.

        An instance the plan does not know (down when it was made) is left to the ranking.
        """
        held = self.hold.get(instance)
        return held is None or model in held or self.room.get(instance, 0) > 0

    def with_arrival(self, instance: str, model: str, now: float) -> Placement:
        """The plan once a job of ``model`` was sent into the room on ``instance``: the model
        is arriving there (the next plan keeps it, see ``settle_s``), and the room is taken.
        Unchanged if the plan holds the model there already, or has no room there (the job
        was ranked on an older plan)."""
        held = self.hold.get(instance)
        if held is None or model in held or self.room.get(instance, 0) <= 0:
            return self
        arriving = {**self.arriving, instance: {**self.arriving.get(instance, {}), model: now}}
        return Placement(
            hold={**self.hold, instance: held | {model}},
            room={**self.room, instance: max(0, self.room.get(instance, 0) - 1)},
            arriving=arriving,
            wanted=self.wanted,
        )


def _mean(values: list[float], default: float) -> float:
    return sum(values) / len(values) if values else default


def plan(
    snapshot: FleetSnapshot,
    previous: Placement | None = None,
    settle_s: float = 5.0,
    linger_s: float = 1.0,
) -> Placement:
    """The models each up instance should hold, given the backlog per model.

    A model whose backlog reads empty keeps one box for ``linger_s`` more: jobs in transit
    between the broker and a router thread are counted nowhere, and a model that had a backlog
    half a second ago most likely still has one.
    """
    now = snapshot.now
    boxes = [i for i in snapshot.instances if i.enabled and i.up(now) and i.models]
    demand = {m: n for m, n in snapshot.backlog.items() if n > 0}
    wanted = dict(previous.wanted) if previous is not None else {}
    wanted.update((m, now) for m in demand)
    for m, t in list(wanted.items()):
        if m not in demand and now - t < linger_s:
            demand[m] = 1
        elif now - t >= linger_s:
            del wanted[m]
    urgent = snapshot.urgent
    by_name = {b.name: b for b in boxes}

    # What each box holds now: what it reported loaded, or what the previous plan is loading.
    state: dict[str, set[str]] = {}
    arriving: dict[str, dict[str, float]] = {}
    for b in boxes:
        pending = {}
        if previous is not None:
            pending = {
                m: t
                for m, t in previous.arriving.get(b.name, {}).items()
                if m not in b.loaded and now - t < settle_s
            }
        if pending and previous is not None:
            state[b.name] = set(previous.hold[b.name]) | set(pending)
            arriving[b.name] = dict(pending)
        else:
            state[b.name] = set(b.loaded)

    # Service and load times per model, over the boxes that learned them.
    models = set(demand)
    service = {
        m: _mean([b.model_ewma_ms[m] for b in boxes if b.model_ewma_ms.get(m)], 0.0)
        or _mean([b.ewma_ms for b in boxes if b.ewma_ms], UNKNOWN_SERVICE_MS)
        for m in models
    }
    load = {
        m: _mean([b.load_ms[m] for b in boxes if m in b.load_ms], DEFAULT_LOAD_MS) for m in models
    }

    # 1. Keep: a loaded model with work stays, on as many boxes as its backlog keeps busy.
    hard: dict[str, set[str]] = {b.name: set() for b in boxes}
    holders: dict[str, list[str]] = {m: [] for m in models}
    for b in boxes:
        for m in sorted(state[b.name]):
            if m in demand and m in b.models:
                holders[m].append(b.name)
    for m, names in holders.items():
        # A switch just decided stays while its model has work, whatever the backlog reads
        # meanwhile: readings made while a batch is still being submitted undercount it, and
        # undoing the switch would cost a load for nothing. Then the others, by name.
        names.sort(key=lambda n: (m not in arriving.get(n, {}), n))
        per_box = min((by_name[n].capacity for n in names), default=1)
        switched = sum(m in arriving.get(n, {}) for n in names)
        del names[max(1, math.ceil(demand[m] / per_box), switched) :]
        for n in names:
            hard[n].add(m)

    def slots(m: str) -> float:
        return sum(by_name[n].capacity / len(hard[n]) for n in holders[m])

    def remaining_ms(m: str) -> float:
        s = slots(m)
        return demand[m] * service[m] / s if s else math.inf

    def evictable(b: InstanceStats) -> int:
        """Models it can take: room, plus loaded models nobody needs there."""
        return b.max_loaded - len(hard[b.name])

    def take(b: InstanceStats, m: str) -> None:
        held = state[b.name]
        if m not in held:
            soft = sorted(held - hard[b.name])
            while len(held) >= b.max_loaded and soft:
                held.discard(soft.pop())
            held.add(m)
            arriving.setdefault(b.name, {})[m] = (
                previous.arriving.get(b.name, {}).get(m, now) if previous else now
            )
        hard[b.name].add(m)
        holders[m].append(b.name)

    # 2. Every model with work gets a box: urgent ones first, then the biggest backlogs.
    for m in sorted(models, key=lambda m: (-(urgent.get(m, 0) > 0), -demand[m], m)):
        if holders[m]:
            continue
        serving = [b for b in boxes if m in b.models]
        free = [b for b in serving if evictable(b) > 0]
        if free:
            # No eviction of needed work: the box with the most room and the least work.
            best = min(
                free,
                key=lambda b: (
                    m not in state[b.name],
                    len(state[b.name]) >= b.max_loaded,
                    len(hard[b.name]),
                    b.in_flight,
                    b.name,
                ),
            )
            take(best, m)
            continue
        # Take a box from the model holding the most (one holding a single box gives it up
        # only to urgent jobs).
        donors = [
            (len(holders[d]), -b.in_flight, b.name, d)
            for b in serving
            for d in hard[b.name]
            if len(holders[d]) >= 2 or (urgent.get(m, 0) > 0 and not urgent.get(d, 0))
        ]
        if not donors:
            continue
        _, _, n, d = max(donors)
        hard[n].discard(d)
        holders[d].remove(n)
        state[n].discard(d)
        take(by_name[n], m)

    # 3. Spare boxes go to the models whose backlog the boxes holding them would take longest
    # to get through, while that is longer than loading the model on one more box.
    heap = [(-remaining_ms(m), m) for m in models if holders[m]]
    heapq.heapify(heap)
    while heap:
        neg, m = heapq.heappop(heap)
        if -neg != remaining_ms(m):  # another model joined one of its boxes: look again
            heapq.heappush(heap, (-remaining_ms(m), m))
            continue
        spare = [
            b for b in boxes if m in b.models and b.name not in holders[m] and evictable(b) > 0
        ]
        if not spare or len(holders[m]) >= math.ceil(demand[m] / spare[0].capacity):
            continue
        best = min(
            spare,
            key=lambda b: (m not in state[b.name], len(hard[b.name]), b.in_flight, b.name),
        )
        cost = 0.0 if m in state[best.name] else load[m]
        if remaining_ms(m) <= cost:
            continue
        take(best, m)
        heapq.heappush(heap, (-remaining_ms(m), m))

    return Placement(
        hold={n: frozenset(state[n]) for n in state},
        room={b.name: max(0, b.max_loaded - len(state[b.name])) for b in boxes},
        arriving={n: a for n, a in arriving.items() if a},
        wanted=wanted,
    )
