"""Waiting for job results without a thread, a connection or a poll loop per waiter.

Celery's Redis result backend stores a result with SET and PUBLISHes it on a channel named
after its key (``celery-task-meta-<id>``). One pub/sub connection per gateway process
subscribes to the channel of every job someone waits for, so a waiting request costs a
future in a dict and wakes the moment its result is stored. The gateway subscribes before it
publishes, so no result can be missed; for a job published elsewhere, a GET right after
subscribing catches a result stored before. A slow re-check catches one published while the
connection was being re-established.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio
from celery import states
from celery.backends.base import Backend, BaseKeyValueStoreBackend

from app.state.client import SENTINEL_SCHEME, async_client

log = logging.getLogger(__name__)

#: How often a waiter looks at its result key in case a notification was missed.
RECHECK_SECONDS = 2.0
#: Longest wait for a free Redis connection when all are in use.
POOL_WAIT_SECONDS = 60
#: The result backends the gateway can watch: a Redis server, or a Sentinel group's primary.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)


class ResultWatcher:
    def __init__(self, url: str, backend: Backend, anchor: str, max_connections: int = 100) -> None:
        if not url.startswith(REDIS_SCHEMES) or not isinstance(backend, BaseKeyValueStoreBackend):
            raise ValueError(
                f"the gateway needs a Redis result backend, not {url.split(':', 1)[0]}://;"
                " set CORRAL_RESULT_BACKEND=redis://... (or sentinel://...)"
            )
        self._redis = async_client(url, max_connections, POOL_WAIT_SECONDS)
        self._pubsub = self._redis.pubsub()
        self._backend: BaseKeyValueStoreBackend = backend
        # A channel nobody publishes on: keeps the pub/sub connection open with no job waiting.
        self._anchor = anchor
        self._waiters: dict[bytes, set[asyncio.Future[dict[str, Any]]]] = {}
        self._expected: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()  # referenced until they finish

    async def start(self) -> None:
        await self._pubsub.subscribe(self._anchor)
        self._listener = asyncio.create_task(self._listen(), name="result-watcher")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pubsub.aclose()
        await self._redis.aclose()

    def _key(self, job_id: str) -> bytes:
        # celery-types says str; Celery's key-value backends make bytes (key_t = ensure_bytes).
        return _as_bytes(self._backend.get_key_for_task(job_id))

    async def peek(self, job_id: str) -> dict[str, Any] | None:
        """The job's stored state (any state, e.g. RETRY), decoded; None if nothing is stored."""
        raw = await self._redis.get(self._key(job_id))
        # The pool does not decode responses: raw is bytes (redis-py types a reply as either).
        return None if raw is None else self._backend.decode_result(raw)  # type: ignore[arg-type]

    async def expect(self, job_id: str) -> None:
        """Listen for a job about to be published: its result cannot be stored before the
        subscription exists, so ``wait`` needs no first look at the stored result."""
        self._expected[job_id] = await self._register(self._key(job_id))

    def forget(self, job_id: str) -> None:
        """Stop listening for an expected job (its publishing failed)."""
        future = self._expected.pop(job_id, None)
        if future is not None:
            self._release(self._key(job_id), future)

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        """The job's final state (SUCCESS, FAILURE or REVOKED); TimeoutError after ``timeout``."""
        loop = asyncio.get_running_loop()
        key = self._key(job_id)
        future = self._expected.pop(job_id, None)
        look = future is None  # a job not expected may have finished already
        if future is None:
            future = await self._register(key)
        deadline = loop.time() + timeout
        try:
            while True:
                if look:
                    meta = await self.peek(job_id)
                    if meta is not None and meta["status"] in states.READY_STATES:
                        return meta
                look = True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"no result for job {job_id} after {timeout:.0f}s")
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(
                        asyncio.shield(future), min(RECHECK_SECONDS, remaining)
                    )
        finally:
            self._release(key, future)

    async def _register(self, key: bytes) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        first = not waiters
        waiters.add(future)
        if first:
            try:
                await self._pubsub.subscribe(key)
            except BaseException:
                self._release(key, future)
                raise
        return future

    def _release(self, key: bytes, future: asyncio.Future[dict[str, Any]]) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            return
        waiters.discard(future)
        if not waiters:
            del self._waiters[key]
            # Not awaited: this runs also while the waiting request is being cancelled.
            task = asyncio.ensure_future(self._unsubscribe(key))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, key: bytes) -> None:
        with contextlib.suppress(redis.RedisError):
            await self._pubsub.unsubscribe(key)

    async def _listen(self) -> None:
        while True:
            try:
                # A blocking read: no timer per message (the anchor keeps it subscribed).
                async for message in self._pubsub.listen():
                    if message["type"] == "message":
                        self._deliver(message["channel"], message["data"])
            except redis.RedisError as exc:
                # Waiters keep re-checking their keys; the connection is re-made on next use.
                log.warning("result watcher: %s; reconnecting", exc)
            await asyncio.sleep(0.5)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        waiters = self._waiters.get(channel)
        if not waiters:
            return
        meta = self._backend.decode_result(data)
        if meta["status"] in states.READY_STATES:
            for future in waiters:
                if not future.done():
                    future.set_result(meta)


def _as_bytes(key: bytes | str) -> bytes:
    return key if isinstance(key, bytes) else key.encode()
