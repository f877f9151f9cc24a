"""The router stage of a job: wait for a slot and move the job there.

Before it seeks a slot, the job's ``before_route`` hooks run (``app.jobs.lifecycle``): the
response cache may answer it, a rate limit may park it in a delay queue. Once it holds a
slot, its ``after_route`` hooks run (the routed counter).

A router thread holds one job at a time. It ranks the instances (``routing.rank``), reserves
a slot on the best one with room, and if none has room it waits for a finishing job to hand
it a slot. Waiting jobs are ordered by tier, then priority, then arrival, so the next free
slot goes to the most urgent job however many batch jobs are queued. The job then moves to
that instance's queue with ``Task.replace``: the caller's task id and ``.get()`` stay valid.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from amqp.exceptions import AMQPError
from celery.exceptions import Ignore, Reject
from kombu.exceptions import OperationalError

from app.errors import JobRejected
from app.jobs import embed_batch
from app.jobs.cancellation import end_revoked, is_revoked
from app.jobs.lifecycle import WHILE_WAITING, job_fields, job_id
from app.jobs.placement import job_started, routing_job, with_plan
from app.observe.tracing import tracer
from app.policy.degradation import degradation, yield_band
from app.policy.live import live_policy
from app.queues import instance_queue, queue_counts, route_queue
from app.schemas import InferRequest, RouteState
from app.settings import TIERS, get_settings
from app.state.fleet import BATCHED, DONE, fleet_state
from routing import Choice, FleetSnapshot, rank

if TYPE_CHECKING:
    from tasks.infer import InferTask

#: How long a waiting job sleeps on its hand-off before it looks at the fleet again.
WAIT_POLL_SECONDS = 1.0

#: Heartbeats a model may go unserved before its waiting jobs are rejected.
UNSERVED_GRACE_BEATS = 10

#: Set when the worker is shutting down: waiting jobs go back to the broker.
shutting_down = threading.Event()
_ticks = itertools.count()


def waiter_score(request: InferRequest, state: RouteState, level: int = 0) -> float:
    """A virtual deadline: the free slot goes to the waiting job with the earliest.

    A job's deadline is its arrival plus its tier's head start (``tier_delay_seconds``) plus
    a second per priority step below 9 (its priority as lowered for fairness, see
    ``app.policy.fairness``). So a fresh interactive job goes before any batch job
    that arrived less than the batch head start ago, and a batch job that has waited longer
    than that competes as if it were interactive: batch work ages, it never starves. Under
    a degradation ``level`` that makes its tier yield, the deadline moves behind every
    more urgent tier's (``app.policy.degradation.yield_band``): the order changes, the job still
    takes any slot nobody more urgent can use.
    """
    s = get_settings()
    return (
        state.submitted_at
        + s.tier_delay_seconds[request.tier]
        + (9 - state.queue_priority(request)) * s.priority_step_seconds
        + yield_band(request.tier, level)
    )


def route(task: InferTask, request: InferRequest, state: RouteState) -> dict[str, Any]:
    # The response cache may answer, a rate limit may park the job (app.jobs.lifecycle).
    handled = task.middleware.before_route(task, request, state)
    if handled is not None:
        answer: dict[str, Any] = handled.value
        return answer
    while True:
        with tracer.start_as_current_span(
            "corral.route", attributes={"model": request.model}
        ) as span:
            instance, choice_score, strategy = _reserve_slot(task, request, state)
            span.set_attributes({"instance": instance, "strategy": strategy})
        if instance != BATCHED:
            break
        # A batched embed call took the job in (app.jobs.embed_batch): its answer comes here.
        # None: that batch failed (the job now runs alone) or died; it waits for a slot again.
        rode = embed_batch.ride(task, request, state)
        if rode is not None:
            return rode
    routed = state.model_copy(
        update={
            "instance": instance,
            "routed_at": time.time(),
            "strategy": strategy,
            "score": choice_score,
        }
    )
    task.middleware.after_route(request, routed)
    sig = task.signature(
        kwargs={**job_fields(task), "_route": routed.model_dump()},
        queue=instance_queue(instance),
        priority=state.queue_priority(request),
        ignore_result=False,
    )
    try:
        return task.replace(sig)
    except (OperationalError, AMQPError) as exc:
        # The broker stayed away through every publish retry, or the connection died in a
        # way kombu does not retry (a cluster node stopping answers 541 INTERNAL_ERROR): this
        # job keeps its slot (a redelivered router finds the grant) and goes back to its
        # queue, not to FAILURE.
        raise Reject(exc, requeue=True) from exc


def _reserve_slot(
    task: InferTask, request: InferRequest, state: RouteState
) -> tuple[str, dict[str, float], str]:
    # Meanwhile the process's planner makes the placement plan again as the backlog changes,
    # and a new plan hands this job a box it moved its model onto (app.jobs.placement).
    with routing_job():
        return _seek_slot(task, request, state)


def _seek_slot(
    task: InferTask, request: InferRequest, state: RouteState
) -> tuple[str, dict[str, float], str]:
    job = job_id(task)
    fleet = fleet_state()
    settings = get_settings()
    agent_class, limits_of = live_policy(settings).class_limits(request.agent, request.agent_class)
    class_cap = (limits_of.max_in_flight if limits_of else None) or 0
    unserved_since: float | None = None
    give_back_at = time.monotonic() + settings.broker_consumer_timeout / 2
    levels = degradation()
    first = True
    # An embed job that has to wait may ride in another's batched call instead (offered once).
    offer = embed_batch.may_batch(request, state, class_cap)
    offered = False
    while True:
        # A job back from waiting shares the process's latest reading of the fleet: dozens of
        # waiting threads each reading it every second cost the router the CPU it needs to
        # move the jobs that were just handed a slot.
        if first:
            snapshot = fleet.instances.snapshot(waiting_for=request.model)
            waiting_now: int | None = snapshot.backlog[request.model]
        else:
            snapshot, waiting_now = _recent_snapshot(), None
        first = False
        if not snapshot.serving(request.model):
            # Either the model is gone, or the registry is (Redis restarted and the
            # instance workers have not re-registered yet): wait a few heartbeats first.
            unserved_since = unserved_since or snapshot.now
            if snapshot.now - unserved_since > UNSERVED_GRACE_BEATS * settings.heartbeat_interval:
                fleet.slots.forget(job, request.model)  # no longer a waiter, nor holding a slot
                raise JobRejected(
                    f"model {request.model!r} is no longer served by any instance",
                    {"job_id": job, "history": state.history},
                )
            time.sleep(WAIT_POLL_SECONDS)
            continue
        unserved_since = None
        strategy = snapshot.strategy_for(request.model, settings.strategy)
        snapshot = with_plan(
            snapshot,
            request.model,
            strategy,
            functools.partial(_backlog, waiting=waiting_now),
            urgent_job=request.tier == "interactive",
        )
        choices = rank(
            snapshot,
            request.model,
            strategy=strategy,
            exclude=state.excluded,
            tick=next(_ticks),
            kind=request.kind,
        )
        candidates = [c.instance for c in choices]
        got = fleet.slots.acquire(
            job,
            request.model,
            # Recomputed each round: a level that changed while the job waited reorders it.
            score=waiter_score(request, state, levels.level()),
            candidates=candidates,
            # While it waits, a job is handed a slot only on an instance it ranked, the plan
            # aside: the hand-off follows the latest plan itself (``lua/handoff.lua``), where
            # this ranking would keep the plan of now for up to ``WAIT_POLL_SECONDS``.
            exclude=_not_ranked(snapshot, request, state, strategy, choices),
            agent_class=agent_class,
            class_cap=class_cap,
            now=snapshot.now,
        )
        if got is None:
            if offer:
                fleet.batches.offer(job, request.batch_key(), request.inputs)
                offer, offered = False, True
            got = fleet.slots.wait_handoff(job, WAIT_POLL_SECONDS)
            if got is None:
                if is_revoked(job):  # app.jobs.cancellation: no longer a waiter, REVOKED
                    end_revoked(task, request, WHILE_WAITING)
                if shutting_down.is_set():
                    # Back to the broker; the job keeps its place among the waiters.
                    raise Reject("router shutting down", requeue=True)
                if time.monotonic() > give_back_at:
                    # RabbitMQ closes the channel of a delivery unacked for its consumer
                    # timeout, and every job this router holds would be redelivered. Give this
                    # one back first: it keeps its place among the waiters, and a slot handed
                    # to it meanwhile waits for it under its lease.
                    raise Reject("waited half the broker's consumer timeout", requeue=True)
                continue
        if got == DONE:
            raise Ignore("job already finished")
        if got == BATCHED:  # the batch that took it in took its offer too
            return got, {}, ""
        if offered:
            fleet.batches.withdraw(job)  # it holds a slot: no batch may take it now
        job_started(request.model, urgent=request.tier == "interactive")
        chosen = next((c.score for c in choices if c.instance == got), {})
        return got, chosen, strategy


def _not_ranked(
    snapshot: FleetSnapshot,
    request: InferRequest,
    state: RouteState,
    strategy: str,
    choices: list[Choice],
) -> list[str]:
    """The instances serving the job's model that its ranking leaves out, not counting those
    the placement plan leaves out."""
    if snapshot.placement is not None:
        choices = rank(
            replace(snapshot, placement=None),
            request.model,
            strategy=strategy,
            exclude=state.excluded,
            kind=request.kind,
        )
    ranked = {c.instance for c in choices}
    return [i.name for i in snapshot.serving(request.model) if i.name not in ranked]


class _RecentSnapshot:
    """The fleet as read at most ``SNAPSHOT_TTL`` seconds ago, shared by the router's threads.

    Good enough to rank instances for a job that has been waiting: the slot counts that
    matter are checked again, atomically, by ``acquire``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = -SNAPSHOT_TTL
        self._snapshot: FleetSnapshot | None = None

    def __call__(self) -> FleetSnapshot:
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._at > SNAPSHOT_TTL:
                self._snapshot = fleet_state().instances.snapshot()
                self._at = time.monotonic()
            return self._snapshot


#: Seconds a waiting job's reading of the fleet is reused.
SNAPSHOT_TTL = 0.5
_recent_snapshot = _RecentSnapshot()


class _Backlog:
    """Jobs of a model waiting to start: held by router threads, or still in a route queue.

    The queue depths come from the broker (a passive declare per tier), read at most every
    ``BACKLOG_TTL`` seconds per model by one thread while the others use the last reading.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, tuple[float, int]] = {}

    def __call__(self, model: str, *, waiting: int | None = None) -> int:
        """Queued (as last read) plus waiting: ``waiting`` if just read, else read now."""
        at, queued = self._queued.get(model, (-BACKLOG_TTL, 0))
        if time.monotonic() - at > BACKLOG_TTL and self._lock.acquire(blocking=False):
            try:
                counts = queue_counts([route_queue(model, t) for t in TIERS])
                queued = sum(ready for ready, _ in counts.values())
                self._queued[model] = (time.monotonic(), queued)
            except (OSError, OperationalError, AMQPError):
                pass  # routing goes on with the last reading
            finally:
                self._lock.release()
        return queued + (fleet_state().slots.waiting(model) if waiting is None else waiting)


#: Seconds a reading of the route queues' depths is reused.
BACKLOG_TTL = 0.5
_backlog = _Backlog()
