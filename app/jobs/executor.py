"""The execution stage of a job: run it on the instance whose slot it holds.

Before calling Ollama the worker confirms, in Redis, that this job holds a slot on this
instance and that no other copy of it is running: a redelivered or duplicated message can
then never put more requests on the server than it has slots. A transient failure frees the
slot, excludes the instance, and sends the job back through the router after a backoff
(``Task.retry`` to the model/tier queue, never to this instance's queue). A permanent failure,
or the last allowed attempt, writes a dead letter and fails with a typed error.

The call runs under the worker's watchdog (``app.jobs.call_guard``), with the silence it may keep
as learned for this instance and model (``app.jobs.silence``): a revoked job's call is closed and
the job ends REVOKED (no retry, no dead letter, the slot freed without a failure counted);
a silent call is a transient failure like any other, and opens the breaker at once when
every call on the instance is silent.

The job's ``before_run`` hooks (``app.jobs.lifecycle``) run just before the call; what a
finished job gives back (its slot, its cache claim, its fairness share) is given back by its
``after_success`` / ``after_failure`` / ``after_revoke`` hooks. Confirming the slot and
recording each failed attempt for the breaker (``fleet_state().finish``, also before a retry)
stay here, next to the call.
"""

from __future__ import annotations

import json
import random
import time
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Ignore
from kombu import Queue

from app.errors import (
    InstanceSilent,
    InstanceUnavailable,
    JobCancelled,
    JobFailed,
    JobRejected,
    OllamaError,
    RetriesExhausted,
)
from app.jobs import embed_batch, silence
from app.jobs.call_guard import Call
from app.jobs.cancellation import end_revoked, is_revoked
from app.jobs.instance_worker import InstanceAgent, current_agent
from app.jobs.lifecycle import WHILE_RUNNING, Ran, cacheable, job_fields, job_id
from app.jobs.relay import token_relay
from app.observe import metrics
from app.observe.tracing import tracer
from app.queues import broker_countdown, dead_letter_queue, queue_arguments, route_queue
from app.schemas import Answer, InferRequest, InferResult, RouteState, RoutingInfo
from app.settings import get_settings
from app.state import failures as recent_failures
from app.state.failures import Failure
from app.state.fleet import fleet_state

if TYPE_CHECKING:
    from celery import Task

    from tasks.infer import InferTask


#: A load_duration longer than this means the model was loaded for this job.
COLD_LOAD_S = 0.2


def execute(task: InferTask, request: InferRequest, state: RouteState) -> dict[str, Any]:
    job = job_id(task)
    instance = state.instance
    assert instance is not None
    agent = current_agent()
    if agent is None or agent.name != instance:
        # Delivered to a worker that does not serve this instance: route it again.
        return _reroute(task, state, countdown=0)

    verdict, stats = fleet_state().start_job(job, instance, agent.token, request.model)
    if verdict in ("done", "dup"):
        raise Ignore(f"job {job} is {'finished' if verdict == 'done' else 'already running'}")
    if verdict == "nogrant":
        # Its slot lease ran out while the message waited (e.g. the worker was down).
        return _reroute(task, state, countdown=0)

    if is_revoked(job):  # revoked after the worker took the message, before the call
        _cancelled(task, request, agent)

    started = time.time()
    attempt = state.attempts + 1
    task.middleware.before_run(request, state, started)
    chars = silence.prompt_chars(request)
    bounds = silence.Budget(None, None)
    if request.kind != "embed":
        bounds = silence.budget(stats, chars, get_settings())
    call = Call(job, bounds.first_s, bounds.gap_s)
    agent.job_started(job, request.model)
    relay = token_relay().sink(job, state.attempts + 1) if request.stream else None
    batch: embed_batch.Batch | None = None
    loading = False
    try:
        if not stats["loaded"]:
            # Its model was not loaded at the last heartbeat: if the server is full, the
            # plan's choice of what to evict goes first (app.jobs.model_swap's make_room),
            # and the load it makes is shown until the job ends, not at the next heartbeat:
            # Ollama loads one model at a time, and the plan puts no other model there meanwhile.
            loading = agent.make_room(request.model)
        # Embed jobs of this model waiting for a slot ride in this call (app.jobs.embed_batch).
        batch = embed_batch.gather(job, instance, request, state)
        with (
            tracer.start_as_current_span(
                f"ollama.{request.kind}",
                attributes={
                    "instance": instance,
                    "model": request.model,
                    "attempt": attempt,
                    "batch_size": batch.size if batch else 1,
                },
            ),
            agent.watchdog.watching(call),
        ):
            own = batch.run(lambda r: agent.client.infer(r, call=call)) if batch else None
            # No batch, or it failed and was split: this job's input alone, on its slot.
            reply = own or agent.client.infer(request, on_chunk=relay, call=call)
    except JobCancelled:
        _cancelled(task, request, agent)
    except OllamaError as exc:
        silent_box = isinstance(exc, InstanceSilent) and call.all_silent
        _on_failure(task, request, state, agent, exc, open_now=silent_box)
    finally:
        agent.job_ended(job)
        if loading:
            agent.loaded_by(request.model)
    finished = time.time()
    if reply.timings.load_s > COLD_LOAD_S:
        # It loaded the model first: what `smart` expects a cold start here to cost.
        fleet_state().instances.record_load(instance, request.model, reply.timings.load_s * 1000)
    result = InferResult(
        **reply.model_dump(),
        id=job,
        kind=request.kind,
        model=request.model,
        routing=RoutingInfo(
            instance=instance,
            queue=(task.request.delivery_info or {}).get("routing_key"),
            attempts=state.attempts + 1,
            wait_s=round(started - state.submitted_at, 6),
            service_s=round(finished - started, 6),
            finished_at=finished,
            strategy=state.strategy,
            score=state.score,
            excluded=state.excluded,
            batch_size=batch.size if batch and own else 1,
            batch_leader=job if batch and own else None,
        ),
    )
    # The slot is freed by the after_success hooks, once the result is stored; the call's
    # timing is learned in the same step.
    # The service time learned for the routers (smart's estimate, the placement plan's) leaves
    # out the call's wait inside Ollama for its model (load_duration: a load, or the requests
    # of the model it evicts): the load is learned apart (record_load) and added where the
    # model is not loaded. Counted in both, one load lengthened the next dozen estimates of
    # the model's jobs by half (EWMA 0.2), and the plan moved a box to the last jobs of a
    # backlog for a load that cost more than it saved (issue 16's timelines).
    own_ms = max(0.0, result.routing.service_s - reply.timings.load_s) * 1000
    task.request.update(
        corral_ran=Ran(
            instance,
            request.model,
            own_ms,
            request.cache_key() if cacheable(request) else None,
            _timing(request.model, reply, call),
        )
    )
    return result.model_dump(mode="json")


def _timing(model: str, reply: Answer, call: Call) -> dict[str, float]:
    """This answer's time to first token and gaps, for the instance's silence stats."""
    if call.first_at is None or call.last_at is None:
        return {}
    first_s = call.first_at - call.started
    # The gaps between chunks, from the first to the last (two chunks or fewer: no gap).
    gap_s = (call.last_at - call.first_at) / (call.chunks - 1) if call.chunks > 2 else None
    return silence.samples(model, reply, first_s, gap_s)


def _cancelled(task: InferTask, request: InferRequest, agent: InstanceAgent) -> NoReturn:
    """The job was revoked while it held a slot here: end it REVOKED, hand the slot on.

    Not a failure of the instance (no error counted, the breaker as it was), never retried,
    never dead-lettered.
    """
    # Before the slot goes (the after_revoke hooks): see _on_failure.
    agent.job_ended(job_id(task))
    end_revoked(task, request, WHILE_RUNNING)


def _on_failure(
    task: Task[Any, Any],
    request: InferRequest,
    state: RouteState,
    agent: InstanceAgent,
    exc: OllamaError,
    *,
    open_now: bool = False,
) -> NoReturn:
    settings = get_settings()
    job = job_id(task)
    # Before the slot goes: the agent's heartbeat re-grants the slot of every job it still
    # counts as running (that is how a grant lost in a Redis restart comes back), and a
    # re-grant here would leave the retry pinned to this instance, and dropped as a duplicate.
    agent.job_ended(job)
    fleet_state().slots.finish(
        job,
        agent.name,
        ok=False,
        model=request.model,
        open_breaker=open_now or isinstance(exc, InstanceUnavailable),
    )
    history = [
        *state.history,
        {
            "instance": agent.name,
            "error": type(exc).__name__,
            "message": str(exc),
            "status": exc.status,
            "at": time.time(),
        },
    ]
    attempts = state.attempts + 1
    # The instance's own retry budget wins over the fleet-wide one; read from Redis, where a
    # change through `corral fleet update` lands at once.
    config = fleet_state().instances.instance_config(agent.name) or agent.config
    budget = config.retry_attempts or settings.max_attempts
    recent_failures.record(
        Failure(
            at=history[-1]["at"],
            job_id=job,
            instance=agent.name,
            error=type(exc).__name__,
            message=str(exc),
            model=request.model,
            tier=request.tier,
            attempt=attempts,
            gave_up=not exc.transient or attempts >= budget,
        )
    )
    failed = state.model_copy(update={"attempts": attempts, "history": history, "instance": None})
    if not exc.transient:
        _give_up(task, request, failed, JobRejected, f"{request.model}: {exc}")
    if attempts >= budget:
        _give_up(
            task,
            request,
            failed,
            RetriesExhausted,
            f"gave up after {attempts} attempts; last: {exc}",
        )
    failed.excluded = sorted({*state.excluded, agent.name})
    # Exponential backoff with full jitter (Celery's own helper takes whole seconds only).
    countdown = random.uniform(
        0, min(settings.retry_backoff_max, settings.retry_backoff * 2 ** (attempts - 1))
    )
    raise task.retry(
        exc=exc,
        countdown=broker_countdown(countdown),
        queue=route_queue(request.model, request.tier),
        kwargs={**job_fields(task), "_route": failed.model_dump()},
        max_retries=None,
        ignore_result=True,
    )


def _reroute(task: Task[Any, Any], state: RouteState, *, countdown: float) -> NoReturn:
    request = InferRequest.model_validate(
        {k: v for k, v in job_fields(task).items() if k != "_route"}
    )
    back = state.model_copy(update={"instance": None})
    sig = task.signature(
        kwargs={**job_fields(task), "_route": back.model_dump()},
        queue=route_queue(request.model, request.tier),
        priority=back.queue_priority(request),
        countdown=countdown,
        ignore_result=True,
    )
    raise task.replace(sig)


def _give_up(
    task: Task[Any, Any],
    request: InferRequest,
    state: RouteState,
    error: type[JobFailed],
    message: str,
) -> NoReturn:
    job = job_id(task)
    details = {
        "job_id": job,
        "model": request.model,
        "attempts": state.attempts,
        "history": state.history,
    }
    dead_letter(job, request, state, error.__name__, message)
    raise error(message, details)


def dead_letter(
    job: str, request: InferRequest, state: RouteState, error: str, message: str
) -> None:
    """Publish the job, its error and its history to the dead-letter queue."""
    from app.celery_app import celery_app

    record = {
        "job_id": job,
        "error": error,
        "message": message,
        "request": request.model_dump(mode="json", exclude_none=True),
        "attempts": state.attempts,
        "history": state.history,
        "submitted_at": state.submitted_at,
        "dead_at": time.time(),
    }
    name = dead_letter_queue()
    queue = Queue(name, routing_key=name, queue_arguments=queue_arguments())
    with celery_app.producer_pool.acquire(block=True) as producer:
        producer.publish(
            json.dumps(record),
            exchange="",
            routing_key=name,
            declare=[queue],
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            retry=True,
        )
    metrics.dead_lettered(request.model, request.tier, error)
