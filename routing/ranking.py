"""The strategies. Each orders the eligible instances, best first.

Eligibility is shared: the instance serves the model, is enabled, is up (not in its
down-cooldown), its role takes the job's kind, and was not already tried by this job. If that
leaves nothing, instances the job already tried are allowed again (a one-instance fleet must
still retry), and if that leaves nothing either the job waits: an empty ranking means "no
instance can take it now".
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from routing.snapshot import FleetSnapshot, InstanceStats

#: A cold load is estimated at this many ms when the instance never reported one.
DEFAULT_LOAD_MS = 5_000.0
#: Service time assumed for an instance that has not served the model yet.
UNKNOWN_SERVICE_MS = 1_000.0


@dataclass(frozen=True, slots=True)
class Choice:
    instance: str
    score: dict[str, float] = field(default_factory=dict)


Ranker = Callable[[list[InstanceStats], str, int], list[Choice]]


def eligible(
    snapshot: FleetSnapshot, model: str, exclude: Sequence[str] = (), kind: str | None = None
) -> list[InstanceStats]:
    up = [i for i in snapshot.serving(model) if i.up(snapshot.now) and i.takes(kind)]
    fresh = [i for i in up if i.name not in exclude]
    return fresh or up


def _rotate(instances: list[InstanceStats], tick: int) -> list[InstanceStats]:
    """Start the scan at a rotating offset, so ties do not always favour the first name."""
    if not instances:
        return instances
    k = tick % len(instances)
    return instances[k:] + instances[:k]


def least_connections(instances: list[InstanceStats], model: str, tick: int) -> list[Choice]:
    ordered = sorted(_rotate(instances, tick), key=lambda i: i.in_flight / i.capacity)
    return [Choice(i.name, {"load": i.in_flight / i.capacity}) for i in ordered]


def round_robin(instances: list[InstanceStats], model: str, tick: int) -> list[Choice]:
    return [Choice(i.name) for i in _rotate(sorted(instances, key=lambda i: i.name), tick)]


def weighted(instances: list[InstanceStats], model: str, tick: int) -> list[Choice]:
    """Free capacity scaled by weight: a weight-2 instance takes twice the share."""
    ordered = sorted(
        _rotate(instances, tick), key=lambda i: (i.in_flight + 1) / (i.capacity * i.weight)
    )
    return [
        Choice(i.name, {"weighted_load": (i.in_flight + 1) / (i.capacity * i.weight)})
        for i in ordered
    ]


def response_time(instances: list[InstanceStats], model: str, tick: int) -> list[Choice]:
    ordered = sorted(
        _rotate(instances, tick), key=lambda i: i.service_ms(model) or UNKNOWN_SERVICE_MS
    )
    return [Choice(i.name, {"ewma_ms": i.service_ms(model)}) for i in ordered]


def random(instances: list[InstanceStats], model: str, tick: int) -> list[Choice]:
    shuffled = list(instances)
    _random.Random(tick).shuffle(shuffled)
    return [Choice(i.name) for i in shuffled]


def _cost_ms(inst: InstanceStats, model: str) -> tuple[float, float, float, float]:
    """(cost, service, cold load, penalty): the estimated time of this job on ``inst``."""
    service = inst.service_ms(model) or UNKNOWN_SERVICE_MS
    cold = 0.0 if model in inst.loaded else inst.load_ms.get(model, DEFAULT_LOAD_MS)
    penalty = (1 + 0.5 * inst.recent_errors) * (1 + inst.host_pressure)
    return (service + cold) * penalty / inst.weight, service, cold, penalty


def smart(instances: list[InstanceStats], model: str, tick: int) -> list[Choice]:
    """Estimated time for this job to finish on each instance, lowest first.

    The estimate is the instance's service time for this model (EWMA), plus a cold-load
    estimate when the model is not loaded there, scaled up by recent errors and host pressure
    and down by weight. Instances without a free slot go last: the router only ever starts a
    job on a free slot, so a busy fast box is worth less than a free slower one right now.
    :func:`rank` then drops the instances too slow to be worth it for the current backlog
    (see :func:`worth_starting`).
    """
    choices = []
    for inst in _rotate(instances, tick):
        cost, service, cold, penalty = _cost_ms(inst, model)
        busy = 0.0 if inst.free else 1.0
        choices.append(
            Choice(
                inst.name,
                {
                    "cost_ms": round(cost, 3),
                    "service_ms": round(service, 3),
                    "cold_ms": cold,
                    "penalty": round(penalty, 3),
                    "busy": busy,
                },
            )
        )
    choices.sort(key=lambda c: (c.score["busy"], c.score["cost_ms"]))
    return choices


STRATEGIES: dict[str, Ranker] = {
    "least_connections": least_connections,
    "round_robin": round_robin,
    "weighted": weighted,
    "response_time": response_time,
    "random": random,
    "smart": smart,
}


def worth_starting(instances: list[InstanceStats], model: str, backlog: int) -> set[str]:
    """The instances on which a job would start sooner than it could finish elsewhere.

    With ``backlog`` jobs waiting, the instances faster than ``inst`` get through them at
    their combined rate; if this job would finish sooner by waiting its turn there than by
    running on ``inst`` (a slow box, or one that must load the model first), ``inst`` is not
    worth it yet. So a slow box or a cold load is used while the backlog is deep, and the
    last jobs of a batch wait for the fast boxes instead of ending up on the slow one.
    """
    worth: set[str] = set()
    rate = 0.0  # jobs per ms that the instances taken so far finish
    fastest = 0.0
    for inst in sorted(instances, key=lambda i: _cost_ms(i, model)[0]):
        cost = _cost_ms(inst, model)[0]
        if worth and cost > (backlog + 1) / rate + fastest:
            break  # every instance after this one is slower still
        worth.add(inst.name)
        rate += inst.capacity / cost
        fastest = fastest or cost
    return worth


def _with_fleet_load(
    instances: list[InstanceStats], fleet: tuple[InstanceStats, ...], model: str
) -> list[InstanceStats]:
    """``instances``, where one has not learned ``model``'s load time yet, with the mean of
    the instances that did: a load takes about as long on each box of a fleet, and assuming
    ``DEFAULT_LOAD_MS`` instead made ``smart`` leave the boxes a placement plan had just
    switched to the model idle (issue 16: boxes idle for 2.5 s after their model's backlog
    ended, the other model's backlog on its single box)."""
    learned = [i.load_ms[model] for i in fleet if model in i.load_ms]
    if not learned:
        return instances
    mean = sum(learned) / len(learned)
    return [
        i if model in i.load_ms else replace(i, load_ms={**i.load_ms, model: mean})
        for i in instances
    ]


def rank(
    snapshot: FleetSnapshot,
    model: str,
    *,
    strategy: str = "least_connections",
    exclude: Sequence[str] = (),
    tick: int = 0,
    kind: str | None = None,
) -> list[Choice]:
    """Instances that may run a job of ``kind`` for ``model``, best first; empty: wait.

    Higher priority levels come first, each in the strategy's order: the router takes the
    first candidate with a free slot, so a lower level only gets the overflow. With a
    placement plan in the snapshot, only the instances it allows for ``model`` are ranked.
    """
    instances = eligible(snapshot, model, exclude, kind)
    plan = snapshot.placement
    if plan is not None:
        # Only where the model is held, being loaded, or fits without evicting another.
        placed = [i for i in instances if plan.allows(i.name, model)]
        if not placed and exclude:  # the plan's boxes were all tried: they may retry it
            placed = [i for i in eligible(snapshot, model, (), kind) if plan.allows(i.name, model)]
        instances = placed
    if strategy == "smart":
        instances = _with_fleet_load(instances, snapshot.instances, model)
    choices = STRATEGIES[strategy](instances, model, tick)
    if strategy == "smart":
        worth = worth_starting(instances, model, snapshot.backlog.get(model, 0))
        choices = [c for c in choices if c.instance in worth]
    level = {i.name: i.priority for i in instances}
    if len(set(level.values())) > 1:
        choices.sort(key=lambda c: -level[c.instance])  # stable: keeps the strategy's order
    return choices
