"""``infer``: the one task agents call.

    >>> r = infer.delay(model="llama3.2:3b", prompt="Why is the sky blue?", tier="interactive")
    >>> r.get(timeout=60).text

A job runs in two stages under one task id. On its model/tier queue a router worker picks an
instance and reserves a slot there (``app.jobs.router``); the job then moves to that instance's
queue, where the instance's worker calls Ollama (``app.jobs.executor``). ``.get()`` returns the
final :class:`~app.schemas.InferResult` or raises a typed :class:`~app.errors.JobFailed`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, cast

import redis
from celery import Task
from celery.exceptions import Reject
from celery.result import AsyncResult
from celery.signals import task_revoked
from celery.utils import uuid
from pydantic import ValidationError

from app.celery_app import celery_app
from app.errors import BrokerUnavailable, InvalidRequest
from app.jobs import executor, lifecycle, router
from app.jobs.lifecycle import (
    SERVED_MODELS_TTL,
    Degradation,
    Fairness,
    Idempotency,
    Job,
    Lifecycle,
    Metrics,
    Ran,
    RateLimits,
    ResponseCache,
    ServedModels,
    Slots,
    Submission,
    Tracing,
)
from app.jobs.publish import Outlet, broker_unavailable, publish_confirmed
from app.queues import route_queue
from app.schemas import InferRequest, InferResult, RouteState
from app.settings import get_settings
from app.state.fleet import fleet_state

__all__ = ["SERVED_MODELS_TTL", "InferAsyncResult", "InferTask", "infer", "validate"]


class InferAsyncResult(AsyncResult[dict[str, Any]]):
    """An AsyncResult whose ``get()`` returns a typed :class:`InferResult`."""

    # The job stores its result as a dict (``InferTask``'s return type); get() returns it as
    # the model it was dumped from, a narrower answer than AsyncResult's.
    def get(self, *args: Any, **kwargs: Any) -> InferResult:  # type: ignore[override]
        return InferResult.model_validate(super().get(*args, **kwargs))


class InferTask(Task[..., dict[str, Any]]):
    name = "corral.infer"
    typing = False

    #: What happens to a job at each transition, one concern per class, hooks called in this
    #: order (``app.jobs.lifecycle`` says why this order). A new policy is one more class here.
    middleware = Lifecycle(
        [
            Tracing(),
            ServedModels(),
            Degradation(),
            Slots(),
            ResponseCache(),
            RateLimits(),
            Idempotency(),
            Fairness(),
            Metrics(),
        ]
    )

    def AsyncResult(self, task_id: str, **kwargs: Any) -> InferAsyncResult:
        return InferAsyncResult(task_id, backend=self.backend, task_name=self.name, app=self.app)

    def delay(self, *args: Any, **kwargs: Any) -> InferAsyncResult:
        """Celery's ``delay``, typed: its result's ``get()`` returns an :class:`InferResult`."""
        return self.apply_async(args, kwargs)

    # Options by keyword only (as Celery's own callers pass them): celery-types also lists
    # task_id, producer, link, link_error and shadow as positional parameters.
    def apply_async(  # type: ignore[override]
        self, args: Any = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> InferAsyncResult:
        kwargs = dict(kwargs or {})
        options.setdefault("kwargsrepr", _display(kwargs))
        if "_route" in kwargs and "queue" in options:
            # A stage of a job already accepted: replace, retry.
            return _ours(super().apply_async(args, kwargs, **options))
        if args:
            raise InvalidRequest("infer takes keyword arguments only, e.g. infer.delay(model=...)")
        sub = self._submission(kwargs, options)
        handled = self.middleware.before_publish(sub)
        if handled is not None:
            answer: InferAsyncResult = handled.value
            return answer
        # Waits for the confirm at most publish_timeout per attempt (a silent broker).
        options.setdefault("confirm_timeout", get_settings().publish_timeout)
        with self._given_back_if_refused([sub]), broker_unavailable():
            return self._publish(sub, options)

    def submit_many(self, requests: Iterable[Mapping[str, Any]]) -> list[InferAsyncResult]:
        """Submit many jobs at once: one ``infer.delay(**fields)`` per mapping of ``requests``,
        all or none; a result per request, in order.

        Every request is validated first, and the publish-time policies see them all at once
        (one Redis round trip each for the lot), then every job is published and the broker's
        confirms are awaited together (``app.jobs.publish``). So any refusal refuses the whole
        call and queues nothing: an invalid request (``InvalidRequest``, naming every invalid
        item), a model nobody serves, a normal job at the refusing degradation level
        (``Overloaded``), or jobs of a refusing class over its rate limit (``RateLimited``:
        their tokens are taken all at once or none). The error's ``item`` is the index of the
        request refused. Each job is otherwise exactly what ``infer.delay`` would make of it:
        the same queue, priority (fairness counts them in list order), idempotency (a
        ``job_key`` bound already, or given twice in the list, answers with the first job).
        """
        subs: list[tuple[Submission, dict[str, Any]]] = []
        invalid: list[tuple[int, InvalidRequest]] = []
        for item, fields in enumerate(requests):
            try:
                request = _fields(fields)
                options = {"kwargsrepr": _display(request)}
                subs.append((self._submission(request, options, item), options))
            except InvalidRequest as exc:
                invalid.append((item, exc))
        if invalid:
            raise _refusing_all(invalid)
        answers = self.middleware.before_publish_many([sub for sub, _ in subs])
        sending = [
            (sub, options)
            for (sub, options), handled in zip(subs, answers, strict=True)
            if handled is None
        ]
        with self._given_back_if_refused([sub for sub, _ in sending]):
            published = iter(
                publish_confirmed(
                    self.app, [partial(self._publish, sub, options) for sub, options in sending]
                )
            )
        return [next(published) if handled is None else handled.value for handled in answers]

    @contextlib.contextmanager
    def _given_back_if_refused(self, subs: Sequence[Submission]) -> Iterator[None]:
        """If the broker does not take the jobs, give back what their checks took for the
        ones it did not confirm (idempotency keys, fairness counts), so that the call can
        simply be made again; the error names those it did confirm (``queued``)."""
        try:
            yield
        except BrokerUnavailable as exc:
            exc.queued = tuple(sub.job for sub in subs[: exc.published])
            self.middleware.after_publish_failed(subs[exc.published :])
            raise

    def _submission(
        self, fields: dict[str, Any], options: dict[str, Any], item: int | None = None
    ) -> Submission:
        """The job a request makes, once valid; ``options`` gets its task id."""
        if "_route" in fields:
            # E.g. an app passing a request body straight to infer.delay(**body).
            raise InvalidRequest("_route is Corral's own bookkeeping: a request may not set it")
        request = validate(fields)
        job = options.setdefault("task_id", uuid())
        return Submission(self, request, job, request.priority, item)

    def _publish(
        self, sub: Submission, options: dict[str, Any], outlet: Outlet | None = None
    ) -> InferAsyncResult:
        """Publish an accepted job to its model and tier's queue. Through a bulk call's
        ``outlet``, its confirm is awaited with the others' and the bulk call retries it."""
        request = sub.request
        queue = route_queue(request.model, request.tier)
        if outlet is not None:
            options = options | {
                "producer": outlet.producer,
                "queue": outlet.queue(queue),
                "retry": False,
            }
        options.setdefault("queue", queue)
        options.setdefault("priority", sub.priority)
        accepted = request.model_dump(mode="json", exclude_none=True)
        route = RouteState(submitted_at=time.time(), priority=sub.priority)
        accepted["_route"] = route.model_dump()
        result = _ours(super().apply_async((), accepted, ignore_result=True, **options))
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
        if not isinstance(retval, dict):  # a router stage that moved the job on
            return
        ran: Ran | None = getattr(self.request, "corral_ran", None)  # None: a cache answer
        self.middleware.after_success(Job(task_id, kwargs), retval, ran)

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: dict[str, Any], einfo: Any
    ) -> None:
        self.middleware.after_failure(Job(task_id, kwargs), exc)


def _ours(result: AsyncResult[dict[str, Any]]) -> InferAsyncResult:
    """What ``Task.apply_async`` returned: ``send_task`` builds it with ``InferTask.AsyncResult``
    (Corral never sets ``task_always_eager``, the one path that returns an ``EagerResult``)."""
    return cast(InferAsyncResult, result)


@task_revoked.connect
def _free_revoked_job(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked job is dropped by the worker that receives it: give back what it held."""
    if request is None or getattr(sender, "name", None) != InferTask.name:
        return
    InferTask.middleware.after_revoke(
        Job(request.id, getattr(request, "kwargs", None)), lifecycle.ON_ARRIVAL
    )


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


def _fields(request: Any) -> dict[str, Any]:
    """A bulk call's request as ``infer``'s keyword arguments."""
    if not isinstance(request, Mapping):
        raise InvalidRequest(
            "each request of submit_many is a mapping of infer's fields,"
            f" not {type(request).__name__}"
        )
    return dict(request)


#: How many invalid requests of a bulk call its error names beside the first.
NAMED_INVALID = 10


def _refusing_all(invalid: list[tuple[int, InvalidRequest]]) -> InvalidRequest:
    """One error for a bulk call's invalid requests: the first one's, naming the others."""
    (item, first), others = invalid[0], [i for i, _ in invalid[1:]]
    text = str(first)
    if others:
        named = ", ".join(str(i) for i in others[:NAMED_INVALID])
        more = f" and {len(others) - NAMED_INVALID} more" if len(others) > NAMED_INVALID else ""
        text += f" (also invalid: items {named}{more})"
    error = InvalidRequest(f"{text}; nothing was queued")
    error.item = item
    return error


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
def infer(
    self: InferTask, /, _route: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
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
            fleet_state().ping()
            return
        except redis.RedisError:
            continue
