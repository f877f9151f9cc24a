"""The job's lifecycle: every policy that acts on a job's transitions, as one ordered list.

Modelled on Dramatiq's middleware: :class:`Middleware` has one no-op method per transition of
a job, each concern is one subclass that implements the hooks it needs, and ``InferTask``
(``tasks.infer``) holds the list, ``InferTask.middleware``. Adding a policy means adding one
class to that list; nobody has to find the four places a job is published, routed, ended and
revoked to learn what else happens there.

The transitions, and who calls their hooks (always through :class:`Lifecycle`, in list order):

* ``before_publish``: at ``infer.delay`` / ``apply_async``, in the caller's process, once the
  request is valid and before anything is published. A hook may refuse the job by raising
  (``ModelNotServed``, ``Overloaded``, ``RateLimited``: raised at the call, nothing queued) or
  answer it with an earlier job (:class:`Handled`); the hooks after it do not run.
  ``before_publish_many`` is the same transition for the jobs of a bulk call
  (``infer.submit_many``), and a single call is a bulk call of one: each concern sees all the
  jobs at once, in list order, so one whose check costs a Redis round trip makes one for the
  lot (by default it calls ``before_publish`` job by job). Any refusal refuses the whole call,
  naming the job refused (``CorralError.item``); since the concerns that refuse come before
  those that write anything (idempotency keys, fairness counts), a refused call leaves no trace
  but the rate-limit tokens it took, as a refused single call does.
* ``before_route`` / ``after_route``: in the router stage (``app.jobs.router``), before the
  router reserves a slot (a hook may end the stage: answer from the cache, park the job in a
  delay queue) and once it holds one.
* ``before_run``: in the execution stage (``app.jobs.executor``), just before the call to
  Ollama.
* ``after_success``: ``InferTask.on_success``, once the job's answer is stored (never for a
  router stage that only moved the job on).
* ``after_failure``: ``InferTask.on_failure``, once the job failed for good (dead-lettered, or
  an error nobody expected).
* ``after_revoke``: a revoked job, wherever it was (``app.jobs.cancellation``): dropped on
  arrival (Celery's ``task_revoked`` signal), stopped while it waited for a slot, or while
  it ran.

Why this order (``InferTask.middleware``)? What matters today, and is kept:

* at the call: a job for a model nobody serves is refused first, then one refused for
  overload, and only then does a refusing rate limit take a token (a refused job costs its
  agent no token); an idempotency key is bound only for a job that passed all three, and
  fairness counts last, just before publishing, so a job answered by an earlier one is not
  counted;
* in the router: a cache answer takes no rate-limit token, so ``ResponseCache`` comes before
  ``RateLimits``;
* at the end: the slot goes first (the scarce resource, handed to the next waiter at once),
  then the cache answer is stored or the claim dropped, then the fairness share; a revoked
  job's cancellation is counted after all of it, and REVOKED stored last. (Before this list
  the fairness share went first on success, failure and revoke-on-arrival: the two are apart
  in Redis and nothing reads one to change the other, so their order is not observable.)

What stays outside: choosing an instance and reserving or handing on its slot (the router),
confirming the slot and recording each attempt's outcome for the breaker (the executor, also
on a transient failure that is retried), the spans around routing and the Ollama call (they
wrap the work rather than mark a transition), and the outcome counters of ``app.observe.metrics``,
which stay on Celery's own signals: ``task_failure`` also fires for a job whose worker was lost,
or that rejected its message without requeueing, where ``Task.on_failure`` is not called.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from celery import states
from pydantic import ValidationError

from app.errors import CorralError, ModelNotServed, Overloaded, RateLimited
from app.jobs.cache import response_cache
from app.observe import metrics
from app.observe.tracing import record_queue_wait
from app.policy import fairness, rate_limits
from app.policy.degradation import REFUSE_LEVEL, degradation
from app.policy.live import live_policy
from app.queues import delay_queue, route_queue
from app.schemas import InferRequest, InferResult, RouteState, RoutingInfo
from app.settings import get_settings
from app.state.fleet import fleet_state

if TYPE_CHECKING:
    from celery import Task

#: Where a revoked job was when its worker heard of it.
Where = Literal["on arrival", "while it waited for a slot", "while it ran"]
ON_ARRIVAL: Where = "on arrival"
WHILE_WAITING: Where = "while it waited for a slot"
WHILE_RUNNING: Where = "while it ran"


@dataclass(frozen=True)
class Handled:
    """A hook's answer that ends the stage: the stage returns ``value``, later hooks and the
    stage's own work do not run."""

    value: Any


@dataclass
class Submission:
    """A job at the call (``before_publish``): valid, not published yet."""

    task: Task[Any, Any]
    request: InferRequest
    #: The task id it is published under.
    job: str
    #: The priority it is queued with inside its tier; ``Fairness`` lowers it.
    priority: int
    #: Its index in the list of a bulk call (``infer.submit_many``); None for a single call.
    item: int | None = None


class Job:
    """A job at a worker's end of a stage: its id and the task's keyword arguments as received
    (``_route`` included). ``request`` is None for a job sent by name with invalid fields."""

    def __init__(
        self, job_id: str, fields: Mapping[str, Any] | None, request: InferRequest | None = None
    ) -> None:
        self.id = job_id
        self.fields: Mapping[str, Any] = fields or {}
        if request is not None:
            self.__dict__["request"] = request

    @cached_property
    def request(self) -> InferRequest | None:
        try:
            return InferRequest.model_validate(
                {k: v for k, v in self.fields.items() if k != "_route"}
            )
        except ValidationError:
            return None

    @property
    def model(self) -> str | None:
        return self.fields.get("model")

    @property
    def tier(self) -> str | None:
        return self.fields.get("tier")

    @property
    def agent(self) -> str | None:
        return self.fields.get("agent")

    @property
    def instance(self) -> str | None:
        """The instance whose slot the message says it holds (None in the router stage)."""
        return (self.fields.get("_route") or {}).get("instance")


def job_id(task: Task[Any, Any]) -> str:
    """The id of the job ``task`` is running (Celery's ``request.id``, None only outside a
    worker's run of a task)."""
    job = task.request.id
    if job is None:
        raise RuntimeError(f"{task.name} is not running a job: its request has no id")
    return job


def job_fields(task: Task[Any, Any]) -> Mapping[str, Any]:
    """The keyword arguments the job ``task`` is running was sent with (``_route`` included;
    Celery's ``request.kwargs``, None only outside a worker's run of a task)."""
    fields = task.request.kwargs
    if fields is None:
        raise RuntimeError(f"{task.name} is not running a job: its request has no kwargs")
    return fields


@dataclass(frozen=True)
class Ran:
    """What ``after_success`` needs of a job that ran on an instance, kept on its request
    context by the executor (``task.request.corral_ran``)."""

    instance: str
    model: str
    service_ms: float
    cache_key: str | None
    #: The call's silence samples (``app.jobs.silence.samples``), folded as the slot is freed.
    timing: dict[str, float] = field(default_factory=dict)
    #: False for an embed job that rode in another job's batched call: it held no slot.
    held_slot: bool = True


class Middleware:
    """A concern that acts on a job's transitions. Every hook is a no-op here; a subclass
    implements the ones it needs and says in its docstring which, and which settings it reads.
    """

    def before_publish(self, sub: Submission) -> Handled | None:
        """At the call, before publishing: raise to refuse, ``Handled(AsyncResult)`` to answer
        with another job."""
        return None

    def before_publish_many(self, subs: Sequence[Submission]) -> list[Handled | None]:
        """``before_publish`` for the jobs of one call at once, an answer per job. Override it
        (not ``before_publish``) where the jobs' checks can share a round trip."""
        answers = []
        for sub in subs:
            try:
                answers.append(self.before_publish(sub))
            except CorralError as exc:
                exc.item = sub.item
                raise
        return answers

    def after_publish_failed(self, subs: Sequence[Submission]) -> None:
        """The broker did not take these jobs (``BrokerUnavailable``): give back what
        ``before_publish`` took for them, as the caller will submit them again."""

    def before_route(
        self, task: Task[Any, Any], request: InferRequest, state: RouteState
    ) -> Handled | None:
        """In the router stage, before a slot is sought: ``Handled`` ends the stage."""
        return None

    def after_route(self, request: InferRequest, routed: RouteState) -> None:
        """In the router stage, once the job holds a slot on ``routed.instance``."""

    def before_run(self, request: InferRequest, state: RouteState, started: float) -> None:
        """In the execution stage, just before the call to Ollama."""

    def after_success(self, job: Job, result: dict[str, Any], ran: Ran | None) -> None:
        """The job's answer is stored; ``ran`` is None for an answer from the cache."""

    def after_failure(self, job: Job, exc: BaseException) -> None:
        """The job failed for good (its FAILURE is stored)."""

    def after_revoke(self, job: Job, where: Where) -> None:
        """The job was revoked; ``where`` it was when its worker heard of it."""


class Lifecycle:
    """The middleware list, and the calls of each hook on every item, in list order."""

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = tuple(middleware)

    def before_publish(self, sub: Submission) -> Handled | None:
        return self.before_publish_many([sub])[0]

    def before_publish_many(self, subs: Sequence[Submission]) -> list[Handled | None]:
        """An answer per job: None to publish it, ``Handled`` when a hook answered it (the
        hooks after that one do not see it)."""
        answers: list[Handled | None] = [None] * len(subs)
        pending = list(range(len(subs)))
        for m in self.middleware:
            if not pending:
                break
            got = m.before_publish_many([subs[i] for i in pending])
            for i, handled in zip(pending, got, strict=True):
                answers[i] = handled
            pending = [i for i, handled in zip(pending, got, strict=True) if handled is None]
        return answers

    def after_publish_failed(self, subs: Sequence[Submission]) -> None:
        for m in self.middleware:
            m.after_publish_failed(subs)

    def before_route(
        self, task: Task[Any, Any], request: InferRequest, state: RouteState
    ) -> Handled | None:
        for m in self.middleware:
            if (handled := m.before_route(task, request, state)) is not None:
                return handled
        return None

    def after_route(self, request: InferRequest, routed: RouteState) -> None:
        for m in self.middleware:
            m.after_route(request, routed)

    def before_run(self, request: InferRequest, state: RouteState, started: float) -> None:
        for m in self.middleware:
            m.before_run(request, state, started)

    def after_success(self, job: Job, result: dict[str, Any], ran: Ran | None) -> None:
        for m in self.middleware:
            m.after_success(job, result, ran)

    def after_failure(self, job: Job, exc: BaseException) -> None:
        for m in self.middleware:
            m.after_failure(job, exc)

    def after_revoke(self, job: Job, where: Where) -> None:
        for m in self.middleware:
            m.after_revoke(job, where)


def cacheable(request: InferRequest) -> bool:
    """Is this request's answer kept in, and looked up in, the response cache?"""
    return request.cache and request.deterministic and get_settings().cache_enabled


# The concerns, in the order of InferTask.middleware ----------------------------------------


class Tracing(Middleware):
    """The ``corral.queue_wait`` span: from submission until an instance starts the job.

    Hooks: ``before_run``. Settings: ``tracing`` (through ``app.observe.tracing``; a no-op tracer
    when off). The ``corral.route`` and ``ollama.<kind>`` spans wrap the router's and the
    executor's own work and stay there.
    """

    def before_run(self, request: InferRequest, state: RouteState, started: float) -> None:
        record_queue_wait(state.submitted_at, model=request.model, tier=request.tier)


class ServedModels(Middleware):
    """Refuse, at the call, a job for a model no instance serves (``ModelNotServed``).

    Hooks: ``before_publish``. Reads the fleet's models from Redis at most every
    ``SERVED_MODELS_TTL`` seconds, plus the models of the configured ``instances``.
    """

    def __init__(self) -> None:
        self._models: set[str] = set()
        self._at = 0.0

    def __contains__(self, model: str) -> bool:
        if model not in self._models or time.monotonic() - self._at > SERVED_MODELS_TTL:
            configured = {m for i in get_settings().instances for m in (i.models or ())}
            self._models = fleet_state().instances.served_models() | configured
            self._at = time.monotonic()
        return model in self._models

    def listing(self) -> str:
        return ", ".join(sorted(self._models)) or "none (is any instance worker running?)"

    def before_publish(self, sub: Submission) -> Handled | None:
        if sub.request.model not in self:
            raise ModelNotServed(
                f"no instance serves model {sub.request.model!r}; served: {self.listing()}"
            )
        return None


#: How long a process trusts its copy of the set of served models.
SERVED_MODELS_TTL = 2.0


class Degradation(Middleware):
    """Graceful degradation (``app.policy.degradation``): refuse new normal jobs at the call
    from ``REFUSE_LEVEL`` on, and feed each job's wait into the signals that set the level.

    Hooks: ``before_publish`` (raises ``Overloaded``), ``after_success`` (records the wait
    of a job that ran: once its answer is stored, so its caller does not wait for it).
    Settings: ``degradation_hold`` (the retry-after a refused caller is told), and those of
    ``app.policy.degradation``.
    """

    def before_publish(self, sub: Submission) -> Handled | None:
        if sub.request.tier == "normal" and degradation().level() >= REFUSE_LEVEL:
            hold = get_settings().degradation_hold
            raise Overloaded(
                f"Corral is overloaded and refuses new normal jobs for now: retry after"
                f" {hold:.0f} s, or submit at the batch tier to wait in the queue"
                " (interactive and batch jobs are still taken)",
                hold,
            )
        return None

    def after_success(self, job: Job, result: dict[str, Any], ran: Ran | None) -> None:
        if ran is not None and job.tier == "interactive":  # the only tier whose wait counts
            degradation().record_wait("interactive", result["routing"]["wait_s"])


class Slots(Middleware):
    """Give back the slot a job holds when it ends, and its place among the waiters.

    Hooks: ``after_success`` (frees the slot, records the service time; a job that rode in
    another's batched embed call held none, it is only marked done), ``after_failure``
    (a safety net for errors the stages did not expect: never leak the slot),
    ``after_revoke`` (a job that ran: the slot is freed without a failure counted; one that
    waited or was dropped on arrival: it stops waiting and frees any slot granted to it).
    Settings: ``grant_lease``, ``result_expires`` and the breaker's (``app.state.fleet``).

    Reserving and handing on slots stays in the router; confirming a slot and recording a
    failed attempt for the breaker (retried or not) stays in the executor.
    """

    def after_success(self, job: Job, result: dict[str, Any], ran: Ran | None) -> None:
        # Runs after the result is stored: only now may the slot (and the duplicate guard
        # that comes with it) go, so a crash in between redelivers rather than loses.
        if ran is not None and ran.held_slot:
            fleet_state().slots.finish(
                job.id,
                ran.instance,
                ok=True,
                model=ran.model,
                service_ms=ran.service_ms,
                timing=ran.timing,
            )
        elif ran is not None:  # rode in a batch (app.jobs.embed_batch): no slot, but done
            fleet_state().slots.settle(job.id)

    def after_failure(self, job: Job, exc: BaseException) -> None:
        if job.instance is not None:
            fleet_state().slots.finish(job.id, job.instance, ok=False)

    def after_revoke(self, job: Job, where: Where) -> None:
        if where == WHILE_RUNNING and job.instance is not None:
            fleet_state().slots.finish(
                job.id, job.instance, ok=False, model=job.model or "", cancelled=True
            )
        elif job.model:
            fleet_state().slots.forget(job.id, job.model)


class ResponseCache(Middleware):
    """The response cache with single flight (``app.jobs.cache``): answer a deterministic job
    from the cache, or claim the right to compute it, or wait for the job that claimed it.

    Hooks: ``before_route`` (answers from the cache: stores the result, ends the stage),
    ``after_success`` (stores the answer, drops the claim), ``after_failure`` and
    ``after_revoke`` (drop the claim, so a duplicate computes it instead of waiting). A job
    dropped on arrival keeps its claim until it expires, as before this list existed.
    Settings: ``cache_enabled``, ``cache_ttl``, ``request_timeout`` and ``max_attempts``
    (how long a claim lasts).
    """

    def before_route(
        self, task: Task[Any, Any], request: InferRequest, state: RouteState
    ) -> Handled | None:
        if not cacheable(request):
            return None
        job = job_id(task)
        cached = _from_cache(job, request, state)
        metrics.cache_lookup(request.model, hit=cached is not None)
        if cached is None:
            return None
        # This stage stores no result of its own (ignore_result), so store the answer.
        task.backend.store_result(job, cached, states.SUCCESS)
        return Handled(cached)

    def after_success(self, job: Job, result: dict[str, Any], ran: Ran | None) -> None:
        if ran is not None and ran.cache_key is not None:
            response_cache().put(ran.cache_key, result, job.id)

    def after_failure(self, job: Job, exc: BaseException) -> None:
        self._release(job)

    def after_revoke(self, job: Job, where: Where) -> None:
        if where != ON_ARRIVAL:
            self._release(job)

    @staticmethod
    def _release(job: Job) -> None:
        request = job.request
        if request is not None and cacheable(request):
            response_cache().release(request.cache_key(), job.id)


def _from_cache(job: str, request: InferRequest, state: RouteState) -> dict[str, Any] | None:
    cache = response_cache()
    digest = request.cache_key()
    hit = cache.get(digest)
    if hit is None:
        s = get_settings()
        budget = s.request_timeout * s.max_attempts
        leader = cache.claim(digest, job, budget)
        if leader == job:
            # The previous leader may have stored its answer (and dropped its claim) between
            # the look-up above and this claim.
            hit = cache.get(digest)
            if hit is None:
                return None
            cache.release(digest, job)
        else:
            hit = cache.wait_for_leader(digest, time.time() + budget)
        if hit is None:
            return None
    result = InferResult.model_validate(hit)
    result.id = job
    now = time.time()
    result.routing = RoutingInfo(
        cache_hit=True, attempts=state.attempts, wait_s=now - state.submitted_at, finished_at=now
    )
    return result.model_dump(mode="json")


class RateLimits(Middleware):
    """Per-agent and per-class rate limits (``app.policy.rate_limits``).

    A class that refuses over its limit takes the job's token at the call and raises
    ``RateLimited`` there; any other limited class takes it in the router, where a job over
    its limit waits its turn in a delay queue (no thread held meanwhile).

    Hooks: ``before_publish_many`` (refusing classes: a bulk call's tokens all at once, or
    none), ``before_route`` (waiting classes: parks the job, ending the stage). Settings: the
    live policy's classes and limits (``app.policy.live``).
    """

    def before_publish_many(self, subs: Sequence[Submission]) -> list[Handled | None]:
        policy = live_policy(get_settings())
        refusing: list[tuple[Submission, str]] = []  # the jobs taking their token now
        for sub in subs:
            agent_class, limits_of = policy.class_limits(sub.request.agent, sub.request.agent_class)
            if limits_of is not None and limits_of.on_limit == "refuse":
                refusing.append((sub, agent_class))
            # Any other class waits its turn in the router, if limited at all.
        short = rate_limits.take_all([(sub.request.agent, c) for sub, c in refusing])
        if short is None:
            return [None] * len(subs)
        for agent_class, jobs in Counter(c for _, c in refusing).items():
            metrics.rate_limited(agent_class, "refused", jobs)
        sub, agent_class = refusing[short.job]
        over = f"agent {sub.request.agent!r} (class {agent_class!r}) is over its rate limit"
        if short.needed == 1:
            message = f"{over}: retry in {short.wait:.1f} s"
        elif short.never_fits:
            message = (
                f"{over}: this call's {short.needed} jobs under {short.limit} limit take their"
                f" tokens at once, and it holds at most {short.bucket.burst:g}: split the call"
                f" (it holds that many again in {short.wait:.1f} s)"
            )
        else:
            message = (
                f"{over}: this call's {short.needed} jobs under {short.limit} limit take their"
                f" tokens at once, or none: retry in {short.wait:.1f} s"
            )
        refused = RateLimited(message, short.wait)
        refused.item = sub.item
        raise refused

    def before_route(
        self, task: Task[Any, Any], request: InferRequest, state: RouteState
    ) -> Handled | None:
        start_after = _rate_limited_until(request, state)
        if start_after is None:
            return None
        return Handled(_park(task, request, state, start_after))


def _rate_limited_until(request: InferRequest, state: RouteState) -> float | None:
    """Take the job's token; the time it is due, or None to start it now."""
    start_after = state.start_after
    if start_after is None:
        settings = get_settings()
        agent_class, limits_of = live_policy(settings).class_limits(
            request.agent, request.agent_class
        )
        if limits_of is not None and limits_of.on_limit == "refuse":
            return None  # took its token when it was submitted
        wait = rate_limits.take(request.agent, agent_class, refuse=False)
        if wait <= 0:
            return None
        metrics.rate_limited(agent_class, "delayed")
        start_after = time.time() + wait
    remaining = start_after - time.time()
    if remaining < 1:
        time.sleep(max(remaining, 0))  # shorter than the shortest delay queue
        return None
    return start_after


def _park(
    task: Task[Any, Any], request: InferRequest, state: RouteState, start_after: float
) -> Any:
    """Send the job to wait in a delay queue, from which RabbitMQ returns it to this router
    (no thread waits for it meanwhile). A long wait takes several stays, halving each time."""
    remaining = start_after - time.time()
    seconds = min(2 ** int(math.log2(max(remaining, 1))), MAX_DELAY_SECONDS)
    delay = delay_queue(route_queue(request.model, request.tier), seconds)
    sig = task.signature(
        kwargs={
            **job_fields(task),
            "_route": state.model_copy(update={"start_after": start_after}).model_dump(),
        },
        # celery-types has signature() take a queue's name only; Celery takes a kombu Queue
        # too, as apply_async does (a delay queue is declared with its arguments).
        queue=delay,  # type: ignore[arg-type]
        priority=state.queue_priority(request),
        ignore_result=True,
    )
    return task.replace(sig)


#: The longest single stay in a delay queue; a longer wait takes several.
MAX_DELAY_SECONDS = 1024


class Idempotency(Middleware):
    """A job submitted with a ``job_key`` already bound to a job is answered by that job.

    Hooks: ``before_publish_many`` (binds each key to its job, or answers with the earlier
    one's result; a key given twice in one bulk call is the first one's),
    ``after_publish_failed`` (unbinds the keys of jobs the broker did not take, so that the
    call made again is not answered by a job that does not exist). Settings:
    ``result_expires`` (how long a key stays bound).
    """

    def after_publish_failed(self, subs: Sequence[Submission]) -> None:
        bound = [(key, sub.job) for sub in subs if (key := sub.request.job_key) is not None]
        if bound:
            fleet_state().job_keys.release(bound)

    def before_publish_many(self, subs: Sequence[Submission]) -> list[Handled | None]:
        claims = [(key, sub.job) for sub in subs if (key := sub.request.job_key) is not None]
        if not claims:
            return [None] * len(subs)
        firsts = fleet_state().job_keys.claim(claims, get_settings().result_expires)
        earlier = {job: first for (_, job), first in zip(claims, firsts, strict=True)}
        return [
            None
            if (first := earlier.get(sub.job)) is None
            else Handled(sub.task.AsyncResult(first))
            for sub in subs
        ]


class Fairness(Middleware):
    """Fairness between the agents of a tier (``app.policy.fairness``): a job is counted
    against its agent when published, which lowers its queue priority, and leaves the count
    when it ends, however it ends.

    Hooks: ``before_publish_many`` (counts them, sets each ``Submission.priority``),
    ``after_publish_failed``, ``after_success``, ``after_failure``, ``after_revoke`` (uncount
    it). Settings: none of its own.
    """

    def after_publish_failed(self, subs: Sequence[Submission]) -> None:
        for sub in subs:
            fairness.job_ended(sub.job, sub.request.tier, sub.request.agent)

    def before_publish_many(self, subs: Sequence[Submission]) -> list[Handled | None]:
        priorities = fairness.fair_priorities(
            [fairness.Counted(s.job, s.request.tier, s.request.agent, s.priority) for s in subs]
        )
        for sub, priority in zip(subs, priorities, strict=True):
            sub.priority = priority
        return [None] * len(subs)

    def after_success(self, job: Job, result: dict[str, Any], ran: Ran | None) -> None:
        fairness.job_ended(job.id, job.tier, job.agent)

    def after_failure(self, job: Job, exc: BaseException) -> None:
        fairness.job_ended(job.id, job.tier, job.agent)

    def after_revoke(self, job: Job, where: Where) -> None:
        fairness.job_ended(job.id, job.tier, job.agent)


class Metrics(Middleware):
    """Job metrics recorded at the job's transitions (``app.observe.metrics``).

    Hooks: ``after_route`` (``corral_jobs_routed_total``), ``after_revoke`` (a job revoked
    while it waited or ran counts as cancelled; one dropped on arrival is not counted).
    Settings: ``metrics_enabled``. The finished, failed and retried counters and latencies
    stay on Celery's signals in ``app.observe.metrics`` (see this module's docstring); the cache
    and rate-limit counters are recorded by ``ResponseCache`` and ``RateLimits``.
    """

    def after_route(self, request: InferRequest, routed: RouteState) -> None:
        metrics.routed(routed.strategy or "", routed.instance or "")

    def after_revoke(self, job: Job, where: Where) -> None:
        if where != ON_ARRIVAL and job.request is not None:
            metrics.cancelled(job.request.model, job.request.tier)
