"""The result backend (``app.state.result_backend``): one round trip, and a SUCCESS stays."""

from __future__ import annotations

import uuid

from celery import states

from app.celery_app import celery_app
from app.state.result_backend import ResultBackend


def test_the_app_stores_results_with_corrals_backend() -> None:
    assert isinstance(celery_app.backend, ResultBackend)


def test_a_success_is_never_overwritten_and_other_states_are() -> None:
    backend = celery_app.backend
    job = f"rb-{uuid.uuid4()}"
    backend.store_result(job, None, states.STARTED)
    assert backend.get_task_meta(job, cache=False)["status"] == states.STARTED
    backend.store_result(job, {"text": "hi"}, states.SUCCESS)
    # A duplicate delivery failing late, or retrying, must not replace the caller's answer.
    backend.store_result(job, ValueError("late"), states.FAILURE)
    backend.store_result(job, None, states.RETRY)
    meta = backend.get_task_meta(job, cache=False)
    assert meta["status"] == states.SUCCESS and meta["result"] == {"text": "hi"}
    assert 0 < backend.client.ttl(backend.get_key_for_task(job)) <= backend.expires
    backend.forget(job)


def test_get_is_woken_by_the_stored_result() -> None:
    job = f"rb-{uuid.uuid4()}"
    pending = celery_app.AsyncResult(job)
    celery_app.backend.store_result(job, {"n": 1}, states.SUCCESS)
    assert pending.get(timeout=5) == {"n": 1}
    pending.forget()
