"""Publishing ``infer`` jobs and getting their outcome, from the event loop without blocking it.

Publishing (validation, a Redis look-up of the served models, an AMQP publish) runs in the
gateway's thread pool, revoking (``app.jobs.cancellation``) on a thread of its own; waiting is
a future resolved by the result watcher.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal, ParamSpec, TypeVar

from celery import states
from celery.exceptions import TaskRevokedError

from app.gateway.errors import GatewayError
from app.gateway.results import ResultWatcher
from app.jobs import cancellation
from app.observe.logs import current_job
from app.schemas import InferResult
from app.state.fleet import fleet_state
from tasks import infer

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Where a job is that has no result yet.
Place = Literal["queued", "waiting_for_slot", "running"]


def place(job_id: str, model: str) -> Place:
    """Where an unfinished job is, from the slot bookkeeping of ``app.state.slots``.

    A job its instance's worker confirmed is running; one in its model's waiter set is held
    by a router thread until a slot frees; anything else is a message in RabbitMQ: a route
    queue, a retry's countdown, or its instance's queue (granted, on its way to the worker).
    """
    position = fleet_state().slots.position(job_id, model)
    if position == "running":
        return "running"
    if position == "waiting":
        return "waiting_for_slot"
    return "queued"


def outcome(meta: dict[str, Any]) -> InferResult:
    """The result of a finished job, or its error raised (JobFailed, TaskRevokedError)."""
    if meta["status"] == states.SUCCESS:
        return InferResult.model_validate(meta["result"])
    if meta["status"] == states.REVOKED:
        raise TaskRevokedError(meta.get("result"))
    error = meta["result"]
    raise error if isinstance(error, BaseException) else RuntimeError(str(error))


class JobClient:
    def __init__(self, threads: ThreadPoolExecutor, results: ResultWatcher, timeout: float):
        self.threads = threads
        # Revokes take turns anyway (``cancellation.cancel``): on a thread of their own, a
        # thousand clients leaving at once cannot fill the pool that publishing needs.
        self.revoker = ThreadPoolExecutor(1, thread_name_prefix="gateway-revoke")
        self.results = results
        self.timeout = timeout

    def close(self) -> None:
        self.revoker.shutdown(wait=False, cancel_futures=True)

    async def blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call in the gateway's thread pool."""
        loop = asyncio.get_running_loop()
        # In this request's context: its trace span and job id follow the call into the thread.
        context = contextvars.copy_context()
        return await loop.run_in_executor(self.threads, partial(context.run, fn, *args, **kwargs))

    async def submit(self, fields: dict[str, Any], *, wait: bool) -> str:
        """Publish a job; InvalidRequest or ModelNotServed raise here, before anything is queued.

        With ``wait``, the result is listened for from before the job exists: call
        :meth:`result` next.
        """
        job_id = str(uuid.uuid4())
        current_job.set(job_id)
        if wait:
            await self.results.expect(job_id)
        try:
            await self.blocking(infer.apply_async, kwargs=fields, task_id=job_id)
        except BaseException:
            self.results.forget(job_id)
            raise
        return job_id

    async def result(self, job_id: str) -> InferResult:
        """Wait for the job's outcome, up to ``gateway_job_timeout`` (then 504)."""
        try:
            meta = await self.results.wait(job_id, self.timeout)
        except TimeoutError:
            raise GatewayError(
                504,
                f"job {job_id} has no result after {self.timeout:.0f}s; it is still queued or"
                f" running: poll GET /jobs/{job_id}, or raise CORRAL_GATEWAY_JOB_TIMEOUT",
                code="timeout",
            ) from None
        return outcome(meta)

    async def cancel(self, job_id: str, model: str) -> Place:
        """Revoke the job wherever it is (``app.jobs.cancellation``); returns where it was.

        Queued, it never runs; waiting for a slot, it stops waiting; running, its call to
        Ollama is closed (Ollama stops generating) and its slot goes to the next job.
        """

        def revoke() -> Place:
            where = place(job_id, model)
            cancellation.cancel(job_id)
            return where

        loop = asyncio.get_running_loop()
        where = await loop.run_in_executor(self.revoker, contextvars.copy_context().run, revoke)
        log.info("job %s: revoked (was %s)", job_id, where)
        return where

    def cancel_soon(self, job_id: str) -> None:
        """Revoke the job without waiting (a stream being torn down)."""
        log.info("job %s: revoked (its stream was abandoned)", job_id)
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self.revoker, cancellation.cancel, job_id)

        def failed(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.warning("job %s could not be revoked: %s", job_id, future.exception())

        done.add_done_callback(failed)
