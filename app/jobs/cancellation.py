"""Cancelling a job, wherever it is: one mechanism, Celery's own revoke.

``cancel`` (the gateway, for a client that left or ``DELETE /jobs/{id}``), ``AsyncResult.revoke()``
and Flower's revoke button all broadcast the same ``revoke`` to every worker, which keeps the
id in its revoked set (``celery.worker.state.revoked``). What each stage does with it:

* a message not yet received (a route queue, a retry's countdown, an instance queue) is dropped
  on arrival by Celery, which stores REVOKED; ``tasks.infer._free_revoked_job`` gives back its
  slot and fairness share;
* a job held by a router thread waiting for a slot: the wait loop looks every second
  (``app.jobs.router``), stops waiting, stores REVOKED;
* a running job: the instance worker's watchdog (``app.jobs.call_guard``) closes its call to Ollama
  within ``call_guard.TICK_S``, which makes Ollama stop generating; the executor frees the
  slot without counting a failure and stores REVOKED (:func:`end_revoked`).

A revoked job is never retried and never dead-lettered; ``.get()`` raises
``celery.exceptions.TaskRevokedError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from celery.exceptions import Ignore
from celery.worker import state as worker_state

if TYPE_CHECKING:
    from app.schemas import InferRequest


def cancel(job_id: str) -> None:
    """Revoke the job, wherever it is (blocking: one publish to the broker)."""
    from app.celery_app import celery_app

    celery_app.control.revoke(job_id)


def is_revoked(job_id: str) -> bool:
    """Has this worker process heard the job revoked? (No I/O: an in-memory set.)"""
    return job_id in worker_state.revoked


def end_revoked(job_id: str, request: InferRequest, where: str) -> NoReturn:
    """End a revoked job that held something (a place among the waiters, a slot), once that
    is given back: its fairness share and cache claim go too, REVOKED is stored (as Celery
    stores it for a message it drops on arrival), and ``Ignore`` acks the message."""
    from app.celery_app import celery_app
    from app.observe import metrics
    from app.policy import fairness
    from app.settings import get_settings

    fairness.job_ended(job_id, request.tier, request.agent)
    if request.cache and request.deterministic and get_settings().cache_enabled:
        from app.jobs.cache import response_cache

        response_cache().release(request.cache_key(), job_id)
    celery_app.backend.mark_as_revoked(job_id, f"revoked {where}")
    metrics.cancelled(request.model, request.tier)
    raise Ignore(f"job {job_id} was revoked {where}")
