"""Which models each instance should hold: the placement plan (issue 16).

An Ollama server holds at most ``max_loaded_models`` models at once; a request for another one
waits inside it until a loaded model's running requests end, then the server evicts that model
and loads the new one. Sent job by job to whichever box has a free slot, two models that share
a fleet of one-model boxes make every box swap model for nearly every job. :func:`plan` decides
instead which models each box should hold, from the fleet and the backlog per model, and the
routers only send a job to a box that holds its model or that the plan is switching to it
(:meth:`Placement.allows`).

The rules:

* a box keeps a model while that model has work, up to the boxes that work can keep busy
  (``ceil(backlog / parallelism)``), or that the plan switched to it less than ``settle_s``
  ago and has not seen loaded yet;
* a model with work and no box gets one: a box with room, else one holding only models
  without work, else (when another model holds two boxes or more, or this model has urgent
  jobs) a box taken from the model that holds the most boxes; a box still loading a model
  the plan switched it to comes last (Ollama loads one model at a time);
* a box is switched to a model only when the switch pays for itself: the boxes that hold the
  model would take longer than the model's load time to get through its backlog, and with
  the box too (once loaded) the backlog would end at least one job's service time sooner, so
  the box that switches then takes a batch of the new model's jobs, not one;
* urgent jobs (interactive, or batch jobs aged past their tier's head start) for a model that
  is loaded nowhere take a box at once: they wait about one load time;
* a model that had urgent jobs keeps its box for ``URGENT_LINGER_S`` after the last one
  started (interactive jobs come one after another with pauses between; losing the box
  between two of them costs the next one a whole load). Not much longer: the place it keeps
  is one another model's backlog could use (at 10 s, a box ran one model's jobs on half its
  slots for 6 s after the interactive stream had ended);
* the plan is the only way in: room on a box (fewer models than it can hold) is given by the
  plan to a model with work, not to whichever job finds it first. Room that let any model in
  filled each box with the models of the first jobs that reached it, three models' jobs
  then shared two places and every job of them loaded its model (issue 16's timelines: two
  boxes of four doing nothing but loads for the first 7 s).

What a box holds is the previous plan's choice, not what it last reported loaded: a report
lags (a load in progress, an eviction Ollama made by itself for a job that went there on an
older plan), and a plan rebuilt from it undid its own switches and made new ones, a load
each. Models it reports loaded beyond the plan's are counted while they fit (a cheap place
for their model), as models nobody needs there.

A box holds what fits there (``routing.capacity.fits``): ``max_loaded`` models and, when its
``memory`` is set, no more bytes than that. A model's size is the largest any box reported for
it (a model not loaded on a box has no size there yet), and a model bigger than a box's memory
is never placed there. Where memory limits, the models without a box get one biggest first
(two small ones placed first, one a box, would leave a big one no box at all until one of
their backlogs ended: a model holding one box gives it up only to urgent jobs).

No I/O: the backlog per model (``FleetSnapshot.backlog`` and ``urgent``), each instance's loaded
models, ``max_loaded``, ``memory`` and ``sizes`` come in the snapshot, and the plan of the
previous call comes in as ``previous`` (what each box holds, and the switches it decided: a
switch is kept as decided for ``settle_s`` seconds, or until the instance reports the model
loaded).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from routing.capacity import fits
from routing.snapshot import FleetSnapshot, InstanceStats

#: Load and service times assumed where nothing was learned (as ``routing.ranking``).
DEFAULT_LOAD_MS = 5_000.0
UNKNOWN_SERVICE_MS = 1_000.0
#: Seconds a model keeps a box after its backlog last read non-empty: jobs in transit between
#: the broker and a router thread are counted nowhere, and a model that had a backlog half a
#: second ago most likely still has one.
LINGER_S = 1.0
#: The same after its last urgent job (see the module's rules).
URGENT_LINGER_S = 3.0


@dataclass(frozen=True, slots=True)
class Placement:
    #: Per instance: the models it should hold (loaded and kept, or being loaded).
    hold: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Per instance: the models the plan switched it to, not reported loaded yet, and when.
    arriving: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Per model: until when it keeps a box without a backlog (``LINGER_S``, ``URGENT_LINGER_S``).
    wanted: dict[str, float] = field(default_factory=dict)
    #: Per model with work: its backlog as this plan read it (the next one rebalances only
    #: backlogs that did not grow since).
    seen: dict[str, int] = field(default_factory=dict)

    def allows(self, instance: str, model: str) -> bool:
        """Whether a job of ``model`` may take a slot on ``instance``.

        An instance the plan does not know (down when it was made) is left to the ranking.
        """
        held = self.hold.get(instance)
        return held is None or model in held

    def with_job(self, model: str, urgent: bool, now: float) -> Placement:
        """The plan once a job of ``model`` started: the model lingers from now on (a job that
        found a slot at once is never seen waiting by a backlog reading)."""
        until = now + (URGENT_LINGER_S if urgent else LINGER_S)
        if self.wanted.get(model, 0.0) >= until:
            return self
        return replace(self, wanted={**self.wanted, model: until})


def _mean(values: list[float], default: float) -> float:
    return sum(values) / len(values) if values else default


def plan(
    snapshot: FleetSnapshot,
    previous: Placement | None = None,
    settle_s: float = 5.0,
) -> Placement:
    """The models each up instance should hold, given the backlog per model.

    A model whose backlog reads empty keeps its box (one) until ``previous.wanted`` says
    (``LINGER_S`` after its last backlog, ``URGENT_LINGER_S`` after its last urgent job); it
    is not given a box it lost meanwhile.
    """
    now = snapshot.now
    boxes = [i for i in snapshot.instances if i.enabled and i.up(now) and i.models]
    demand = {m: n for m, n in snapshot.backlog.items() if n > 0}
    wanted = {m: t for m, t in (previous.wanted if previous else {}).items() if t > now}
    for m in demand:
        linger = URGENT_LINGER_S if snapshot.urgent.get(m, 0) > 0 else LINGER_S
        wanted[m] = max(wanted.get(m, 0.0), now + linger)
    lingering = {m for m in wanted if m not in demand}
    demand.update((m, 1) for m in lingering)
    urgent = snapshot.urgent
    by_name = {b.name: b for b in boxes}
    size: dict[str, float] = {}
    for i in snapshot.instances:
        for m, reported in i.sizes.items():
            size[m] = max(size.get(m, 0.0), reported)

    def fit(b: InstanceStats, held: set[str]) -> bool:
        return fits(held, b.max_loaded, b.memory, size)

    # What each box holds now: the previous plan's models (and the switches it decided, until
    # they settle), loaded ones first, then the models it reports loaded beside them, each
    # while it fits (a size learned since the last plan, a budget lowered, can leave less room).
    state: dict[str, set[str]] = {}
    arriving: dict[str, dict[str, float]] = {}
    for b in boxes:
        held = previous.hold.get(b.name) if previous is not None else None
        state[b.name] = set()
        kept = sorted(held or (), key=lambda m: (m not in b.loaded, m))
        for m in kept + sorted(b.loaded - set(held or ())):
            if fit(b, state[b.name] | {m}):
                state[b.name].add(m)
        if previous is not None and held is not None:
            pending = {
                m: t
                for m, t in previous.arriving.get(b.name, {}).items()
                if m in state[b.name] and m not in b.loaded and now - t < settle_s
            }
            if pending:
                arriving[b.name] = pending

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
        # undoing the switch would cost a load for nothing. Then those where it is loaded.
        names.sort(key=lambda n: (m not in arriving.get(n, {}), m not in by_name[n].loaded, n))
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

    def saved_ms(m: str, b: InstanceStats, cost: float) -> float:
        """How much sooner ``m``'s backlog would end with ``b`` too, ``b`` joining after
        ``cost``: the backlog's work spread over the slots it has and ``b``'s. Less than one
        job's service time, and the switch is noise in the estimate: ``b`` loads the model for
        the last job or two of each slot (issue 16's two-model timelines: a box switched a
        second before the backlog's end, loaded for 1 s, then ran 2 jobs and ended last)."""
        have, add = slots(m), b.capacity / (len(hard[b.name]) + 1)
        after = (demand[m] * service[m] + add * cost) / (have + add)
        return remaining_ms(m) - after

    def loading_until(b: InstanceStats) -> float:
        """When the loads of the switches pending on ``b`` should be over (now if none): each
        switch's time, plus a job's service (its first job waits for a slot there) and the
        model's load; the loads a job or a preload has begun there (``InstanceStats.loading``)
        one after the other from their starts, as Ollama runs them (one model at a time; a
        request sent during a load waits for it, then loads its own). A model placed on ``b``
        waits for them. Not "any switch pending": what a box reports loaded lags a heartbeat
        (2 s), and right after a batch's first loads every box had one; the cold model then
        went to a box whose second load had just begun, and its job waited for that load
        too. Nor the latest of the loads begun: a box loading one model with a job of another
        queued behind was taken as free a load early (the urgent job waited three loads)."""
        pending = arriving.get(b.name, {})
        queued = -math.inf
        for since, model in sorted((t, a) for a, t in b.loading.items()):
            queued = max(queued, since) + load.get(model, DEFAULT_LOAD_MS) / 1000
        return max(
            [now, queued]
            + [
                t + (service.get(a, UNKNOWN_SERVICE_MS) + load.get(a, DEFAULT_LOAD_MS)) / 1000
                for a, t in pending.items()
                if a not in b.loading
            ]
        )

    def can_take(b: InstanceStats, m: str, leaving: str = "") -> bool:
        """Whether ``m`` fits on ``b`` beside the models needed there (but ``leaving``): its
        room, plus the loaded models nobody needs there (``take`` drops them)."""
        return fit(b, (hard[b.name] - {leaving}) | {m})

    def take(b: InstanceStats, m: str) -> None:
        held = state[b.name]
        if m not in held:
            soft = sorted(held - hard[b.name])
            while not fit(b, held | {m}) and soft:
                held.discard(soft.pop())
            held.add(m)
        if m not in b.loaded and m not in arriving.get(b.name, {}):
            arriving.setdefault(b.name, {})[m] = (
                previous.arriving.get(b.name, {}).get(m, now) if previous else now
            )
        hard[b.name].add(m)
        holders[m].append(b.name)

    # 2. Every model with work gets a box: urgent ones first, then, where memory limits, the
    # biggest models (see the module's docstring), then the biggest backlogs.
    packing = any(b.memory is not None for b in boxes)
    for m in sorted(
        models,
        key=lambda m: (
            -(urgent.get(m, 0) > 0),
            -size.get(m, 0.0) if packing else 0.0,
            -demand[m],
            m,
        ),
    ):
        if holders[m] or m in lingering:
            continue
        serving = [b for b in boxes if m in b.models]
        free = [b for b in serving if can_take(b, m)]
        if free:
            # No eviction of needed work: the box with the most room and the least work, and
            # not one still loading a model the plan switched it to (Ollama loads one model
            # at a time: this one would wait for that load, an urgent job a second more).
            best = min(
                free,
                key=lambda b: (
                    m not in state[b.name],
                    loading_until(b),
                    not fit(b, state[b.name] | {m}),
                    len(hard[b.name]),
                    b.in_flight,
                    b.name,
                ),
            )
            take(best, m)
            continue
        # Take a box from the model holding the most (one holding a single box gives it up
        # only to urgent jobs), first of all the box whose pending switches should be loaded
        # the soonest (none: now; a load in progress there would go first), and where the
        # model is loaded already if it is anywhere. A model a job is loading there gives up
        # its place last: its load and the jobs queued inside Ollama for it run anyway, then
        # it leaves (an urgent job waited for a load, two jobs of the model, and its own load).
        # Only a donor whose leaving makes room for the model.
        donors = [
            (
                -loading_until(b) - (service[d] / 1000 if d in b.loading else 0.0),
                len(holders[d]),
                m in b.loaded,
                -b.in_flight,
                b.name,
                d,
            )
            for b in serving
            for d in hard[b.name]
            if (len(holders[d]) >= 2 or (urgent.get(m, 0) > 0 and not urgent.get(d, 0)))
            and can_take(b, m, leaving=d)
        ]
        if not donors:
            continue
        *_, n, d = max(donors)
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
        spare = [b for b in boxes if m in b.models and b.name not in holders[m] and can_take(b, m)]
        if not spare or len(holders[m]) >= math.ceil(demand[m] / spare[0].capacity):
            continue
        best = min(
            spare,
            key=lambda b: (m not in state[b.name], len(hard[b.name]), b.in_flight, b.name),
        )
        cost = 0.0 if m in state[best.name] else load[m]
        if remaining_ms(m) <= cost or saved_ms(m, best, cost) < service[m]:
            continue
        take(best, m)
        heapq.heappush(heap, (-remaining_ms(m), m))

    # 4. Rebalance: a box moves from a model whose backlog would end early to the one whose
    # backlog would end last, when that ends the latter at least one job's time sooner and the
    # former still no later than the latter. Without it, two models sharing three one-model
    # boxes ran one backlog on two boxes and the other on one, until the first ended and its
    # boxes idled, then loaded the second (issue 16's two-model timelines: 1.3 x ideal). Only
    # between backlogs that are draining (neither read higher than at the last plan): while a
    # batch is still being submitted the readings grow by tens of jobs, and a rebalance on them
    # sent boxes back and forth (20-27 loads where 5 do). Never a box just switched.
    seen = previous.seen if previous is not None else {}
    draining = {m for m in models if m not in lingering and demand[m] <= seen.get(m, -1)}
    for _ in range(len(boxes)):
        last = max((m for m in draining if holders[m]), key=remaining_ms, default=None)
        if last is None:
            break
        moves: list[tuple[float, str, str]] = []
        for d in draining - {last}:
            if len(holders[d]) < 2:
                continue
            for n in holders[d]:
                b = by_name[n]
                if last not in b.models or d in arriving.get(n, {}) or last in hard[n]:
                    continue
                if not can_take(b, last, leaving=d):
                    continue
                share = b.capacity / len(hard[n])
                cost = 0.0 if last in state[n] else load[last]
                d_after = demand[d] * service[d] / (slots(d) - share)
                last_after = (demand[last] * service[last] + share * cost) / (slots(last) + share)
                # The donor must still end no later than the receiver: a move that made it
                # the last instead was undone by the next plan (a load each way, twice).
                gain = remaining_ms(last) - last_after
                if gain >= service[last] and d_after <= last_after:
                    moves.append((gain, n, d))
        if not moves:
            break
        _, n, d = max(moves)
        hard[n].discard(d)
        holders[d].remove(n)
        state[n].discard(d)
        take(by_name[n], last)

    # Only switches to models the box still holds: one the plan just undid (a donor's, a
    # model room was made from) would have its worker preload a model nobody wants there.
    arriving = {n: {m: t for m, t in a.items() if m in state[n]} for n, a in arriving.items()}
    return Placement(
        hold={n: frozenset(state[n]) for n in state},
        arriving={n: a for n, a in arriving.items() if a},
        wanted=wanted,
        seen={m: n for m, n in demand.items() if m not in lingering},
    )
