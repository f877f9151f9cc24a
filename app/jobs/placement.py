"""The placement plan on the job path (``routing.placement``): the backlog of every model read
for it, and the plan each router process keeps.

Every routing decision attaches the plan to its snapshot of the fleet, and ``routing.rank``
then ranks only the instances the plan allows for the job's model. The plan is computed again
only when its inputs change: a new reading of the backlog (at most every ``DEMAND_TTL``
seconds, by one thread while the others use the last one), a change in what the instances
hold or whether they are up, or a second gone by (switches it decided settle). Otherwise a
decision costs a comparison of the fleet's loaded models with the last ones. While jobs of
the process look for a slot, a thread of its own (``keep_planning``) also makes it again as
those inputs change, whether or not a job is routed meanwhile.

The plan each router makes is published (``app.state.placement``): the hand-off of a freed slot
to a waiting job follows the latest one (``app/state/lua/handoff.lua``), the idle slots of a box
it moved a model onto are offered to that model's waiting jobs at once (``Slots.offer``), the
instance workers act on its switches (``app.jobs.model_swap``; nudged at once for a switch made
for urgent jobs), and the other routers build on it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

from amqp.exceptions import AMQPError
from kombu.exceptions import OperationalError
from redis import RedisError

from app.queues import queue_counts, route_queue
from app.settings import TIERS, get_settings
from app.state.fleet import fleet_state
from app.state.placement import Version
from routing import FleetSnapshot, Placement, plan

#: Seconds a reading of every model's backlog is reused.
DEMAND_TTL = 0.5
#: Seconds after which the plan is made again even if nothing it reads changed.
REPLAN_SECONDS = 1.0
#: Seconds the last plan stays shown once no router makes one.
SHOWN_FOR_S = 10.0
#: Seconds between two looks of a router process's own planner at the fleet (``keep_planning``).
PLAN_EVERY_S = 0.25
#: Plans made in a row when other routers publish theirs first (``_Planner._make``).
PLAN_TRIES = 3

log = logging.getLogger(__name__)

_Reading = tuple[float, dict[str, int], dict[str, int]]


class _Demand:
    """Per model: jobs waiting to start (queued, or held by router threads), and the urgent
    ones among them (queued interactive, or waiting with a deadline already due)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reading: _Reading = (-DEMAND_TTL, {}, {})

    def __call__(self, models: Callable[[], list[str]]) -> _Reading:
        if time.monotonic() - self.reading[0] <= DEMAND_TTL:
            return self.reading
        # The first reading is waited for: a plan made without it would allow every box.
        if self._lock.acquire(blocking=self.reading[0] < 0):
            if time.monotonic() - self.reading[0] <= DEMAND_TTL:
                self._lock.release()
                return self.reading
            try:
                self.reading = self._read(models())
            except (OSError, OperationalError, AMQPError, RedisError):
                pass  # routing goes on with the last reading
            finally:
                self._lock.release()
        return self.reading

    @staticmethod
    def _read(models: list[str]) -> _Reading:
        s = get_settings()
        queued = queue_counts([route_queue(m, t) for m in models for t in TIERS])
        # Due: an interactive job of any priority, or one whose tier's head start is over.
        due_by = time.time() + s.tier_delay_seconds["interactive"] + 9 * s.priority_step_seconds
        waiting = fleet_state().slots.waiting_and_urgent(models, due_by)
        backlog, urgent = {}, {}
        for m in models:
            backlog[m] = waiting[m][0] + sum(queued[route_queue(m, t)][0] for t in TIERS)
            urgent[m] = waiting[m][1] + queued[route_queue(m, "interactive")][0]
        return time.monotonic(), backlog, urgent


class _Planner:
    """The process's plan, made again only when what it reads changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: object = None
        self._at = 0.0
        self._plan: Placement | None = None
        #: Names this process's plans among the routers' (``_previous``).
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def __call__(self, snapshot: FleetSnapshot, reading_at: float) -> Placement:
        now = snapshot.now
        key = (
            reading_at,
            tuple(
                (
                    i.name,
                    i.loaded,
                    i.max_loaded,
                    i.memory,
                    tuple(sorted(i.sizes.items())),
                    i.capacity,
                    i.enabled and i.up(now),
                )
                for i in snapshot.instances
            ),
        )
        if self._plan is not None and key == self._key and now - self._at <= REPLAN_SECONDS:
            return self._plan
        # One thread makes the plan again; the others use the last one meanwhile.
        if not self._lock.acquire(blocking=self._plan is None):
            return self._plan  # type: ignore[return-value]  # None only while blocking
        try:
            if self._plan is None or key != self._key or now - self._at > REPLAN_SECONDS:
                self._plan = self._make(snapshot)
                self._key, self._at = key, now
            return self._plan
        finally:
            self._lock.release()

    def again(self, snapshot: FleetSnapshot) -> Placement:
        """Plan now, whatever changed (a job the reading missed, see ``with_plan``); the plan
        then stands until the next reading."""
        with self._lock:
            self._plan = self._make(snapshot)
            self._at = snapshot.now
            return self._plan

    def _make(self, snapshot: FleetSnapshot) -> Placement:
        """Plan on the latest plan published and publish the new one (``_show``); if another
        router published one meanwhile, plan again on that one (at most ``PLAN_TRIES`` times,
        then the plan routes this process's jobs unpublished).

        Each router process plans for itself, and two of them planning at once, each on the
        plan before, each undid the other's latest switches: the first plan gave a model
        loaded nowhere a box for its urgent job and nudged the box's worker, the second (its
        reading older by a few hundred milliseconds) gave the box back, and the worker found
        nothing to load; the urgent job waited 0.3 s more for a third plan."""
        for _ in range(PLAN_TRIES):
            based_on, previous = self._previous()
            placement = plan(snapshot, previous)
            if _show(placement, self.id, snapshot.now, previous, snapshot.urgent, based_on):
                break
        return placement

    def _previous(self) -> tuple[Version | None, Placement | None]:
        """The latest plan published (which router made it, and when: None if none is
        current), as the plan to build on: each router process (one per tier) plans for
        itself, and building on the latest plan whoever made it keeps them on the same
        switches (each planning on its own history, they placed a cold model on two different
        boxes, each evicting models the other plan kept).

        No plan to build on when none is current (none published for ``SHOWN_FOR_S``: the
        fleet was idle, or the plan was cleared): what the boxes held then is no longer what
        they hold (keep-alives expire), and a plan built on it sent the first model of the
        next batch to every box that had held it, to load it there."""
        try:
            latest = fleet_state().placement.latest()
        except (RedisError, ValueError, KeyError, TypeError):
            return None, self._plan
        if latest is None:
            return None, None
        based_on = (latest.by, latest.at)
        if latest.by == self.id:
            return based_on, self._plan
        wanted = dict(latest.wanted)
        for m, until in (self._plan.wanted if self._plan is not None else {}).items():
            wanted[m] = max(until, wanted.get(m, 0.0))
        return based_on, Placement(
            hold={name: frozenset(models) for name, models in latest.hold.items()},
            arriving={name: dict(models) for name, models in latest.arriving.items()},
            wanted=wanted,
            seen=dict(latest.seen),
        )

    def started(self, model: str, urgent: bool, now: float) -> None:
        """A job of ``model`` took a slot: the model lingers (``Placement.with_job``)."""
        with self._lock:
            if self._plan is not None:
                self._plan = self._plan.with_job(model, urgent, now)


def _show(
    placement: Placement,
    by: str,
    at: float,
    previous: Placement | None,
    urgent: Mapping[str, int],
    based_on: Version | None,
) -> bool:
    """Keep the new plan where the dashboard, ``corral fleet list``, the instance workers
    (``app.jobs.model_swap``), the other routers (``_Planner._previous``) and the slot
    hand-off (``lua/handoff.lua``) read it; then offer the idle slots of each box it moved a
    model onto to that model's waiting jobs (``gained``), and nudge the worker of a box it
    moved a model with ``urgent`` jobs onto.

    Only if the plan published is still the one it was built on (``based_on``): False if
    another router published one since (nothing done)."""
    hold = {name: sorted(models) for name, models in placement.hold.items()}
    arriving = {name: dict(models) for name, models in placement.arriving.items()}
    # What people see, and what the instance workers unload and preload: routing goes on
    # with the plan whatever Redis says.
    with contextlib.suppress(RedisError):
        if not fleet_state().placement.publish(
            hold,
            ttl_s=SHOWN_FOR_S,
            arriving=arriving,
            by=by,
            at=at,
            wanted=placement.wanted,
            seen=placement.seen,
            based_on=based_on,
        ):
            return False
        # A waiting job is handed a slot when a job frees one, or finds one when it looks at
        # the fleet again (every ``WAIT_POLL_SECONDS``). A box the plan just moved its model
        # onto is often idle (the model it held ran out of work), and without the offer its
        # slots stayed idle up to a second, a whole load time in issue 16's bench.
        moved = gained(previous, placement)
        fleet_state().slots.offer(moved)
        # The worker would act on the switch once it settled (a few seconds, see
        # app.jobs.model_swap): an urgent job would then wait for its slot, then for the load.
        # Nudged, it evicts and preloads now, while the job waits for the slot.
        for instance, models in moved.items():
            if hurry := [m for m in models if urgent.get(m, 0) > 0]:
                fleet_state().placement.nudge(instance, hurry)
    return True


def gained(previous: Placement | None, placement: Placement) -> dict[str, list[str]]:
    """Per instance, the models ``placement`` holds there and ``previous`` did not."""
    out = {}
    for name, models in placement.hold.items():
        before = previous.hold.get(name, frozenset()) if previous is not None else frozenset()
        if new := sorted(models - before):
            out[name] = new
    return out


_demand = _Demand()
_planner = _Planner()
#: Jobs of this process looking for a slot (``routing_job``): it plans by itself only meanwhile.
_routing = 0
_routing_lock = threading.Lock()


@contextlib.contextmanager
def routing_job() -> Iterator[None]:
    """Around a job's search for a slot, waits included (``app.jobs.router``)."""
    global _routing
    with _routing_lock:
        _routing += 1
    try:
        yield
    finally:
        with _routing_lock:
            _routing -= 1


def keep_planning(stop: threading.Event) -> None:
    """Make the plan again as the fleet and the backlog change, not only when a job is routed:
    the router's thread, started with the worker (``app.jobs.router_worker``).

    A plan made on a job's way through the router stood until the next job came or a waiting
    one looked again (up to a second): made as a batch was being submitted, from a reading
    that saw only its first jobs, it left a box without a model for a second (issue 16's
    timelines). Planning here, with ``_show`` offering the idle slots of a box to the models
    moved onto it, a change of the backlog reaches the boxes within ``PLAN_EVERY_S`` plus the
    reading's age. Only while this process holds jobs looking for a slot: a plan made with no
    work anywhere would keep the last one's models everywhere, published as current, and
    the next batch's first jobs would go to every box that held their model (the bench
    clears the plan between runs for that reason: planning on, it put them back).
    """
    while not stop.wait(PLAN_EVERY_S):
        if not get_settings().placement or not _routing:
            continue
        try:
            snapshot = fleet_state().instances.snapshot()
            at, waiting, urgent = _demand(functools.partial(_served, snapshot))
            _planner(replace(snapshot, backlog=waiting, urgent=urgent), at)
        except (OSError, RedisError, OperationalError, AMQPError):
            log.warning("planning the placement failed", exc_info=True)


def _served(snapshot: FleetSnapshot) -> list[str]:
    return sorted({m for i in snapshot.instances for m in i.models})


def job_started(model: str, urgent: bool) -> None:
    """Called by the router once a job of ``model`` holds a slot (``_Planner.started``)."""
    if get_settings().placement:
        _planner.started(model, urgent, time.time())


def with_plan(
    snapshot: FleetSnapshot,
    model: str,
    strategy: str,
    backlog: Callable[[str], int],
    urgent_job: bool = False,
) -> FleetSnapshot:
    """The snapshot with what ``routing.rank`` needs for ``strategy``: with the ``placement``
    setting, every model's backlog and the placement plan; for ``smart``, the backlog of
    ``model`` as ``backlog`` reads it now (a plan can wait half a second for its reading; the
    last jobs of a backlog cannot, or they start on a slow box a fast one would have beaten).

    The job being routed is neither queued nor waiting yet, so the reading misses it: when
    the plan allows its model nowhere and the reading counts no job of it (no urgent one, for
    an ``urgent_job``), the plan is made again counting this job. Otherwise the first job for
    a model loaded nowhere would wait for its next look at the fleet (a second) before the
    plan gives its model a box.
    """
    current = {model: backlog(model)} if strategy == "smart" else {}
    if not get_settings().placement:
        return replace(snapshot, backlog=current)
    at, waiting, urgent = _demand(lambda: _served(snapshot))
    snapshot = replace(snapshot, backlog=waiting, urgent=urgent)
    placement = _planner(snapshot, at)
    missed = not waiting.get(model) or (urgent_job and not urgent.get(model))
    if missed and not _allowed_anywhere(placement, snapshot, model):
        waiting = {**waiting, model: waiting.get(model, 0) + 1}
        if urgent_job:
            urgent = {**urgent, model: urgent.get(model, 0) + 1}
        snapshot = replace(snapshot, backlog=waiting, urgent=urgent)
        placement = _planner.again(snapshot)
    return replace(snapshot, placement=placement, backlog={**waiting, **current})


def _allowed_anywhere(placement: Placement, snapshot: FleetSnapshot, model: str) -> bool:
    return any(
        placement.allows(i.name, model) for i in snapshot.serving(model) if i.up(snapshot.now)
    )
