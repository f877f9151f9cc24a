"""Job metrics: each process records what its jobs did; the sums live in Redis.

Recorded where the fact is known, with no change to the task's own code beyond three calls:

* Celery signals in the worker that ran the stage: ``task_success`` (outcome, and the wait,
  service and total latency from ``InferResult.routing``), ``task_failure`` and
  ``task_retry`` (one per transient failure sent back through the router);
* ``routed``, ``cache_lookup``, ``rate_limited`` and ``cancelled``, called by the job's
  lifecycle middleware (``app.jobs.lifecycle``: ``Metrics``, ``ResponseCache``, ``RateLimits``)
  in the router stage, at the call (refused jobs) and when a revoked job ends;
* ``dead_lettered``, called when a job is written to the dead-letter queue (``app.jobs.executor``);
* ``ignored_options``, called by the gateway for options Ollama would ignore
  (``app.gateway.native``);
* ``placement_changed``, called by the instance worker's agent (``app.jobs.instance_worker``)
  when its server's ``/api/ps`` differs from the previous heartbeat's: a model that appeared
  is a load, one that disappeared an eviction (or a keep-alive expiry: /api/ps cannot tell
  them apart). A model loaded and unloaded between two heartbeats is not seen;
* ``unload_sent`` and ``preload_sent``, called by the same agent (``app.jobs.model_swap``) for
  the unloads and preloads it sends to follow the placement plan.

Why Redis rather than a /metrics port per worker: see ``app.observe.metrics_store``. ``corral
metrics`` serves these sums next to the fleet gauges of ``app.ops.metrics_fleet``. Recording
never fails a job: with Redis unreachable the sample is dropped and a warning logged (the
job itself needs Redis anyway). ``CORRAL_METRICS_ENABLED=false`` turns recording off.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from celery import Task
from celery.signals import task_failure, task_retry, task_success

from app.celery_app import INFER_TASK
from app.observe.metrics_store import Batch, Flusher, MetricSpec, MetricStore
from app.options import OBSOLETE_OPTIONS
from app.schemas import RoutingInfo
from app.settings import get_settings
from app.state.client import redis_client

log = logging.getLogger(__name__)

#: Seconds: from a cache answer (milliseconds) to a long generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOBS = MetricSpec(
    "corral_jobs_finished_total",
    "Jobs finished, by outcome: succeeded (run by an instance), cached, failed, cancelled.",
    ("model", "tier", "outcome"),
)
WAIT = MetricSpec(
    "corral_job_wait_seconds",
    "From submission until an instance started the job's last attempt (queues, slot wait).",
    ("model", "tier"),
    LATENCY_BUCKETS,
)
SERVICE = MetricSpec(
    "corral_job_service_seconds",
    "Time the instance spent on the job's last attempt (the Ollama call).",
    ("model", "tier"),
    LATENCY_BUCKETS,
)
TOTAL = MetricSpec(
    "corral_job_duration_seconds",
    "From submission until the answer, for jobs run by an instance (wait + service).",
    ("model", "tier"),
    LATENCY_BUCKETS,
)
ROUTED = MetricSpec(
    "corral_routing_decisions_total",
    "Slots reserved by the routers, by strategy and the instance chosen.",
    ("strategy", "instance"),
)
RETRIES = MetricSpec(
    "corral_job_retries_total",
    "Attempts that failed with a transient error and went back to the router.",
    ("model", "tier", "instance", "error"),
)
DEAD = MetricSpec(
    "corral_jobs_dead_lettered_total",
    "Jobs written to the dead-letter queue, by error.",
    ("model", "tier", "error"),
)
CACHE = MetricSpec(
    "corral_cache_lookups_total",
    "Response-cache lookups of deterministic requests, by result (hit or miss).",
    ("model", "result"),
)
LIMITED = MetricSpec(
    "corral_jobs_rate_limited_total",
    "Jobs over a rate limit, by agent class: delayed (waited their turn) or refused.",
    ("agent_class", "action"),
)
IGNORED_OPTIONS = MetricSpec(
    "corral_ignored_options_total",
    "Options the gateway's Ollama API dropped as Ollama would ignore them: an obsolete"
    " option by name, any other unknown name as `unknown` (client-chosen names would make"
    " the label set unbounded; the gateway's log names them).",
    ("option",),
)
MODEL_LOADS = MetricSpec(
    "corral_model_loads_total",
    "Models that appeared in an instance's /api/ps between two heartbeats of its worker.",
    ("instance", "model"),
)
MODEL_EVICTIONS = MetricSpec(
    "corral_model_evictions_total",
    "Models that left an instance's /api/ps between two heartbeats of its worker (evicted"
    " for another model, or unloaded when their keep-alive ran out).",
    ("instance", "model"),
)
UNLOADS_SENT = MetricSpec(
    "corral_model_unloads_sent_total",
    "keep_alive 0 sent by an instance's worker for a model the placement plan moved off it.",
    ("instance", "model"),
)
PRELOADS_SENT = MetricSpec(
    "corral_model_preloads_sent_total",
    "Preloads (an empty prompt, or an empty embed input) sent by an instance's worker for a"
    " model the placement plan moved onto it, by outcome: loaded or failed.",
    ("instance", "model", "outcome"),
)
JOB_METRICS = (
    JOBS,
    WAIT,
    SERVICE,
    TOTAL,
    ROUTED,
    RETRIES,
    DEAD,
    CACHE,
    LIMITED,
    IGNORED_OPTIONS,
    MODEL_LOADS,
    MODEL_EVICTIONS,
    UNLOADS_SENT,
    PRELOADS_SENT,
)


def job_store() -> MetricStore:
    s = get_settings()
    return MetricStore(redis_client(s.redis_url), s.namespace, JOB_METRICS)


@functools.cache
def _flusher() -> Flusher:
    return Flusher(job_store(), get_settings().metrics_flush_seconds)


def _write(batch: Batch) -> None:
    if get_settings().metrics_enabled:
        _flusher().add(batch)


# Hooks called by the job's code ---------------------------------------------------------


def routed(strategy: str, instance: str) -> None:
    batch = Batch()
    batch.inc(ROUTED, strategy=strategy, instance=instance)
    _write(batch)


def cache_lookup(model: str, *, hit: bool) -> None:
    batch = Batch()
    batch.inc(CACHE, model=model, result="hit" if hit else "miss")
    _write(batch)


def rate_limited(agent_class: str, action: str, jobs: int = 1) -> None:
    batch = Batch()
    batch.inc(LIMITED, jobs, agent_class=agent_class, action=action)
    _write(batch)


def ignored_options(names: list[str]) -> None:
    """Options a request carried that Ollama would ignore (see ``app.schemas.OBSOLETE_OPTIONS``)."""
    batch = Batch()
    for name in names:
        batch.inc(IGNORED_OPTIONS, option=name if name in OBSOLETE_OPTIONS else "unknown")
    _write(batch)


def placement_changed(instance: str, loaded: Iterable[str], evicted: Iterable[str]) -> None:
    """Models an instance loaded and evicted since its worker's previous heartbeat."""
    batch = Batch()
    for model in loaded:
        batch.inc(MODEL_LOADS, instance=instance, model=model)
    for model in evicted:
        batch.inc(MODEL_EVICTIONS, instance=instance, model=model)
    _write(batch)


def unload_sent(instance: str, model: str) -> None:
    batch = Batch()
    batch.inc(UNLOADS_SENT, instance=instance, model=model)
    _write(batch)


def preload_sent(instance: str, model: str, *, loaded: bool) -> None:
    batch = Batch()
    outcome = "loaded" if loaded else "failed"
    batch.inc(PRELOADS_SENT, instance=instance, model=model, outcome=outcome)
    _write(batch)


def dead_lettered(model: str, tier: str, error: str) -> None:
    batch = Batch()
    batch.inc(DEAD, model=model, tier=tier, error=error)
    _write(batch)


def cancelled(model: str, tier: str) -> None:
    """A job revoked while it held a slot or ran (one dropped on arrival is not counted)."""
    batch = Batch()
    batch.inc(JOBS, model=model, tier=tier, outcome="cancelled")
    _write(batch)


# Celery signals, in whichever worker ran the stage ----------------------------------------


class JobLabels(TypedDict):
    """The labels every job metric carries."""

    model: str
    tier: str


def _job_labels(kwargs: Mapping[str, Any] | None) -> JobLabels | None:
    """model and tier of an accepted job (both are always in its kwargs, validated)."""
    kwargs = kwargs or {}
    if "model" not in kwargs:
        return None
    return {"model": kwargs["model"], "tier": kwargs.get("tier") or get_settings().default_tier}


@task_success.connect
def _job_succeeded(sender: Task[Any, Any] | None = None, result: Any = None, **_: Any) -> None:
    # The router stage that moved a job to an instance returns None: not an outcome.
    if sender is None or sender.name != INFER_TASK or not isinstance(result, dict):
        return
    labels = _job_labels(sender.request.kwargs)
    if labels is None:
        return
    routing = RoutingInfo.model_validate(result.get("routing") or {})
    batch = Batch()
    if routing.cache_hit:
        batch.inc(JOBS, outcome="cached", **labels)
    else:
        batch.inc(JOBS, outcome="succeeded", **labels)
        batch.observe(WAIT, routing.wait_s, **labels)
        batch.observe(SERVICE, routing.service_s, **labels)
        batch.observe(TOTAL, routing.wait_s + routing.service_s, **labels)
    _write(batch)


@task_failure.connect
def _job_failed(
    sender: Task[Any, Any] | None = None, kwargs: dict[str, Any] | None = None, **_: Any
) -> None:
    labels = _job_labels(kwargs) if getattr(sender, "name", None) == INFER_TASK else None
    if labels is None:
        return
    batch = Batch()
    batch.inc(JOBS, outcome="failed", **labels)
    _write(batch)


@task_retry.connect
def _job_retried(
    sender: Task[Any, Any] | None = None, request: Any = None, reason: Any = None, **_: Any
) -> None:
    kwargs = getattr(request, "kwargs", None) or {}
    labels = _job_labels(kwargs) if getattr(sender, "name", None) == INFER_TASK else None
    if labels is None:
        return
    # ``reason`` is Celery's Retry; the error that caused it is its ``exc``.
    error = getattr(reason, "exc", None) or reason
    instance = (kwargs.get("_route") or {}).get("instance") or ""
    batch = Batch()
    batch.inc(RETRIES, instance=instance, error=type(error).__name__, **labels)
    _write(batch)
