"""Celery's Redis result backend, storing a result in one round trip instead of two.

Celery's key-value backend protects a stored SUCCESS from being overwritten (a task delivered
twice, a worker lost mid-task): it reads the stored result, then writes. Every job pays that
read between the end of its call and its slot's next job, so this backend does both in one
script (``lua/store_result.lua``), atomically, which also closes the window between the read
and the write. Everything else (keys, expiry, the pub/sub that wakes ``.get()``) is Celery's.

``app.celery_app`` names it (a string: Celery imports it) in ``result_backend`` for a
``redis://`` or ``rediss://`` URL, and :class:`SentinelResultBackend`, the same store on
Celery's Sentinel backend, for a ``sentinel://`` one.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from app.state.scripts import script


class AtomicStore(RedisBackend):
    """The one-round-trip store, over whichever Redis backend it is mixed into."""

    # Set by Celery's backend; its type stubs do not declare them.
    expires: int | None
    failure_expires: int | None
    _MAX_STR_VALUE_SIZE: int

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta: dict[str, Any] = self._get_result_meta(  # type: ignore[attr-defined]  # as above
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store_once, (self.get_key_for_task(task_id), value, expires))
        return result

    def _store_once(self, key: bytes, value: bytes | str, expires: int | None) -> None:
        script(self.client, "store_result.lua")(keys=[key], args=[value, int(expires or 0)])


class ResultBackend(AtomicStore):
    """A single Redis server (``redis://``, ``rediss://``)."""


class SentinelResultBackend(AtomicStore, SentinelBackend):
    """A Sentinel group's primary (``sentinel://``; service name: ``redis_sentinel_master``)."""
