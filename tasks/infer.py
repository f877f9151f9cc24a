"""``infer``: the one task agents call.

    >>> r = infer.delay(model="llama3.2:3b", prompt="Why is the sky blue?", tier="interactive")
    >>> r.get(timeout=60).text

A job runs in two stages under one task id. On its model/tier queue a router worker picks an
instance and reserves a slot there (``app.jobs.router``); the job then moves to that instance's
queue, where the instance's worker calls Ollama (``app.jobs.executor``). ``.get()`` returns the
final :class:`~app.schemas.InferResult` or raises a typed :class:`~app.errors.JobFailed`.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from celery.result import AsyncResult
from celery.signals import task_revoked
from celery.utils import uuid
from pydantic import ValidationError

from app.celery_app import celery_app
from app.errors import InvalidRequest, ModelNotServed, Overloaded, RateLimited
from app.jobs import executor, router
from app.ops import metrics
from app.policy import fairness, rate_limits
from app.policy.degradation import REFUSE_LEVEL, degradation
from app.policy.live import live_policy
from app.queues import route_queue
from app.schemas import InferRequest, InferResult, RouteState
from app.settings import get_settings
from app.state import keys
from app.state.fleet import fleet_state

#: How long a process trusts its copy of the set of served models.
SERVED_MODELS_TTL = 2.0


class InferAsyncResult(AsyncResult):
    """An AsyncResult whose ``get()`` returns a typed :class:`InferResult`."""

    def get(self, *args: Any, **kwargs: Any) -> InferResult:  # type: ignore[override]
        return InferResult.model_validate(super().get(*args, **kwargs))


class _ServedModels:
    """The fleet's models, refreshed from Redis at most every ``SERVED_MODELS_TTL`` seconds."""

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


class InferTask(Task):
    name = "corral.infer"
    typing = False
    _served = _ServedModels()

    def AsyncResult(self, task_id: str, **kwargs: Any) -> InferAsyncResult:
        return InferAsyncResult(task_id, backend=self.backend, task_name=self.name, app=self.app)

    def apply_async(
        self, args: Any = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> InferAsyncResult:
        kwargs = dict(kwargs or {})
        options.setdefault("kwargsrepr", _display(kwargs))
        if "_route" in kwargs:
            if "queue" in options:  # a stage of a job already accepted: replace, retry
                return super().apply_async(args, kwargs, **options)
            # E.g. an app passing a request body straight to infer.delay(**body).
            raise InvalidRequest("_route is Corral's own bookkeeping: a request may not set it")
        if args:
            raise InvalidRequest("infer takes keyword arguments only, e.g. infer.delay(model=...)")
        request = validate(kwargs)
        if request.model not in self._served:
            raise ModelNotServed(
                f"no instance serves model {request.model!r}; served: {self._served.listing()}"
            )
        _refuse_if_overloaded(request)
        _refuse_if_over_limit(request)
        if request.job_key is not None:
            first = _claim_job_key(request.job_key, options.setdefault("task_id", uuid()))
            if first is not None:
                return self.AsyncResult(first)
        job = options.setdefault("task_id", uuid())
        priority = fairness.fair_priority(job, request.tier, request.agent, request.priority)
        options.setdefault("queue", route_queue(request.model, request.tier))
        options.setdefault("priority", priority)
        accepted = request.model_dump(mode="json", exclude_none=True)
        accepted["_route"] = RouteState(submitted_at=time.time(), priority=priority).model_dump()
        result = super().apply_async((), accepted, ignore_result=True, **options)
        # The router stage stores nothing; the caller waits for the execution stage's result.
        result.ignored = False
        return result

    def on_replace(self, sig: Any) -> None:
        """Publish the replacement, then let the router stage end quietly.

        Celery's default raises ``Ignore``, and the worker formats a full traceback for it,
        twice: measured at about a third of the router's CPU per job. The router stage is
        published with ``ignore_result=True``, so returning normally stores nothing and the
        caller's ``.get()`` still returns the replacement's result under the same id.
        ``replace`` already moved this request's callbacks and chain onto ``sig``.
        """
        if not self.request.ignore_result:
            return super().on_replace(sig)
        sig.delay()
        self.request.callbacks = None
        self.request.chain = None
        return None

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: dict[str, Any]) -> None:
        # Runs after the result is stored: only now may the slot (and the duplicate guard
        # that comes with it) go, so a crash in between redelivers rather than loses.
        if isinstance(retval, dict):  # the job's answer (not a router stage that moved it)
            fairness.job_ended(task_id, kwargs.get("tier"), kwargs.get("agent"))
        ran: executor.Ran | None = getattr(self.request, "corral_ran", None)
        if ran is None:  # the router stage, or a cache hit
            return
        fleet_state().slots.finish(
            task_id, ran.instance, ok=True, model=ran.model, service_ms=ran.service_ms
        )
        if ran.cache_key is not None:
            from app.jobs.cache import response_cache

            response_cache().put(ran.cache_key, retval, task_id)

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: dict[str, Any], einfo: Any
    ) -> None:
        fairness.job_ended(task_id, kwargs.get("tier"), kwargs.get("agent"))
        # Safety net for errors the stages did not expect: never leak the slot.
        instance = (kwargs.get("_route") or {}).get("instance")
        if instance is not None:
            fleet_state().slots.finish(task_id, instance, ok=False)
        try:
            request = InferRequest.model_validate(
                {k: v for k, v in kwargs.items() if k != "_route"}
            )
        except ValidationError:
            return  # sent by name with bad input: it never claimed anything
        if request.cache and request.deterministic:
            from app.jobs.cache import response_cache

            response_cache().release(request.cache_key(), task_id)


def _refuse_if_overloaded(request: InferRequest) -> None:
    if request.tier == "normal" and degradation().level() >= REFUSE_LEVEL:
        hold = get_settings().degradation_hold
        raise Overloaded(
            f"Corral is overloaded and refuses new normal jobs for now: retry after"
            f" {hold:.0f} s, or submit at the batch tier to wait in the queue"
            " (interactive and batch jobs are still taken)",
            hold,
        )


def _refuse_if_over_limit(request: InferRequest) -> None:
    """For a class that refuses over its limit: take the job's token now, or raise."""
    settings = get_settings()
    agent_class, limits_of = live_policy(settings).class_limits(request.agent, request.agent_class)
    if limits_of is None or limits_of.on_limit != "refuse":
        return  # waits its turn in the router, if limited at all
    wait = rate_limits.take(request.agent, agent_class, refuse=True)
    if wait > 0:
        metrics.rate_limited(agent_class, "refused")
        raise RateLimited(
            f"agent {request.agent!r} (class {agent_class!r}) is over its rate limit:"
            f" retry in {wait:.1f} s",
            wait,
        )


@task_revoked.connect
def _free_revoked_job(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked job is dropped by the worker that receives it: give back what it held."""
    if request is None or getattr(sender, "name", None) != InferTask.name:
        return
    kwargs = getattr(request, "kwargs", None) or {}
    fairness.job_ended(request.id, kwargs.get("tier"), kwargs.get("agent"))
    if kwargs.get("model"):
        fleet_state().slots.forget(request.id, kwargs["model"])


def _claim_job_key(key: str, task_id: str) -> str | None:
    """Bind an idempotency key to ``task_id``; returns the earlier job's id if it was bound."""
    fleet = fleet_state()
    name = keys.job_key(fleet.ns, key)
    if fleet.redis.set(name, task_id, nx=True, ex=get_settings().result_expires):
        return None
    return fleet.redis.get(name)


def _display(value: Any, limit: int = 80) -> str:
    """What logs and Flower show of a job: long texts cut, Corral's bookkeeping left out."""

    def short(v: Any) -> Any:
        if isinstance(v, str) and len(v) > limit:
            return v[:limit] + "..."
        if isinstance(v, list):
            return [short(x) for x in v[:4]] + (["..."] if len(v) > 4 else [])
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items() if k != "_route"}
        return v

    return repr(short(value))


def validate(fields: dict[str, Any]) -> InferRequest:
    """The request as a model, or InvalidRequest listing every problem."""
    try:
        return InferRequest.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid infer request: {problems}") from None


@celery_app.task(base=InferTask, bind=True, name="corral.infer")
def infer(self: InferTask, _route: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    request = validate(fields)
    # No _route: sent by name (send_task) from an app that does not import Corral.
    state = RouteState.model_validate(_route or {"submitted_at": time.time()})
    try:
        if state.instance is None:
            return router.route(self, request, state)
        return executor.execute(self, request, state)
    except redis.RedisError as exc:
        # Corral's live state is unreachable (Redis restarting): back to the queue once Redis
        # answers again, rather than a failure for a job that did nothing wrong. Waiting here
        # first means one requeue per job and outage, not a reject-redeliver loop meanwhile.
        _wait_for_redis()
        raise Reject(exc, requeue=True) from exc


#: How often, and how long at most, a job that met an unreachable Redis checks it again
#: before going back to its queue (bounded, so a worker's warm shutdown is not held up).
REDIS_PAUSE_S = 0.5
REDIS_WAIT_MAX_S = 30.0


def _wait_for_redis() -> None:
    deadline = time.monotonic() + REDIS_WAIT_MAX_S
    while time.monotonic() < deadline:
        time.sleep(REDIS_PAUSE_S)
        try:
            fleet_state().redis.ping()
            return
        except redis.RedisError:
            continue
