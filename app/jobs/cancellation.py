"""Cancelling a job, wherever it is: one mechanism, Celery's own revoke.

``cancel`` (the gateway, for a client that left or ``DELETE /jobs/{id}``), ``AsyncResult.revoke()``
and Flower's revoke button all broadcast the same ``revoke`` to every worker, which keeps the
id in its revoked set (``celery.worker.state.revoked``). What each stage does with it:

* a message not yet received (a route queue, a retry's countdown, an instance queue) is dropped
  on arrival by Celery, which stores REVOKED; ``tasks.infer._free_revoked_job`` runs the job's
  ``after_revoke`` hooks (``app.jobs.lifecycle``), which give back its slot and fairness share;
* a job held by a router thread waiting for a slot: the wait loop looks every second
  (``app.jobs.router``), stops waiting, stores REVOKED;
* a running job: the instance worker's watchdog (``app.jobs.call_guard``) closes its call to Ollama
  within ``call_guard.TICK_S``, which makes Ollama stop generating; the slot is freed without
  counting a failure and REVOKED stored (:func:`end_revoked`).

A revoked job is never retried and never dead-lettered; ``.get()`` raises
``celery.exceptions.TaskRevokedError``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NoReturn

from celery.exceptions import Ignore
from celery.worker import state as worker_state

from app.celery_app import celery_app

if TYPE_CHECKING:
    from app.jobs.lifecycle import Where
    from app.schemas import InferRequest
    from tasks.infer import InferTask


#: One revoke at a time per process. Celery's ``control.revoke`` holds a connection from the
#: app's pool while it takes a producer, and a producer takes a second connection from the
#: same pool: with more threads revoking at once than the pool holds (``broker_pool_limit``,
#: 10), each can hold one connection and wait for another, for ever, and every publish of the
#: process waits behind them. A revoke is one publish: taking turns costs milliseconds.
_one_revoke_at_a_time = threading.Lock()


def cancel(job_id: str) -> None:
    """Revoke the job, wherever it is (blocking: one publish to the broker)."""
    with _one_revoke_at_a_time:
        celery_app.control.revoke(job_id)


def is_revoked(job_id: str) -> bool:
    """Has this worker process heard the job revoked? (No I/O: an in-memory set.)"""
    return job_id in worker_state.revoked


def end_revoked(task: InferTask, request: InferRequest, where: Where) -> NoReturn:
    """End a revoked job that held something (a place among the waiters, a slot): its
    ``after_revoke`` hooks give back its slot, cache claim and fairness share and count it
    cancelled; then REVOKED is stored (as Celery stores it for a message it drops on arrival)
    and ``Ignore`` acks the message."""
    from app.jobs.lifecycle import Job, job_id

    job = job_id(task)
    task.middleware.after_revoke(Job(job, task.request.kwargs, request), where)
    celery_app.backend.mark_as_revoked(job, f"revoked {where}")
    raise Ignore(f"job {job} was revoked {where}")
