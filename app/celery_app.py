"""The one Celery app, configured from Corral's settings (the cookiecutter-django shape).

Every process imports this module, so queue arguments (``app.queues.queue_arguments``) are
declared identically everywhere: RabbitMQ refuses a redeclaration with different arguments. A Django
or Flask project configures this same app from its own settings with :func:`configure_from`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.utils.collections import ConfigurationView

from app.queues import MAX_PRIORITY, batch_queue
from app.schedules import EmbedFolder, PromptFile
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The name of Corral's one job task (``tasks.infer``), for code that sends or recognises it
#: without importing the task.
INFER_TASK = "corral.infer"


def beat_schedule(schedules: list[EmbedFolder | PromptFile]) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` for Corral's ``schedules`` setting: one entry each."""
    entries = {}
    for s in schedules:
        options: dict[str, Any] = {"queue": batch_queue()}
        if s.every is not None:
            # A run not started before the next one is due is dropped, so runs do not pile
            # up while the batch router is down.
            options["expires"] = s.every
        entries[s.name] = {
            "task": f"corral.batch.{s.job}",
            "schedule": s.when(),
            "kwargs": {"spec": s.model_dump(mode="json")},
            "options": options,
        }
    return entries


#: Celery's Redis result backends storing a result in one round trip
#: (``app.state.result_backend``), named as Celery takes a backend class:
#: ``<module>:<class>+<URL>``.
RESULT_BACKEND_CLASSES = {
    "redis": "app.state.result_backend:ResultBackend",
    "rediss": "app.state.result_backend:ResultBackend",
    "sentinel": "app.state.result_backend:SentinelResultBackend",
}


def _result_backend(url: str) -> str:
    backend = RESULT_BACKEND_CLASSES.get(url.partition("://")[0])
    return f"{backend}+{url}" if backend else url


def _queue_kind(settings: Settings) -> dict[str, Any]:
    """Celery's settings for the queues it creates, per ``queue_type`` (``app.queues``)."""
    if settings.queue_type == "quorum":
        # No x-max-priority (RabbitMQ 3.x refuses it on a quorum queue), and topic exchanges:
        # Celery's native delayed delivery, which keeps a retry's countdown in the broker,
        # cannot route through direct ones.
        return {
            "task_queue_max_priority": None,
            "task_default_queue_type": "quorum",
            "task_create_missing_queue_type": "quorum",
            "task_create_missing_queue_exchange_type": "topic",
        }
    return {
        "task_queue_max_priority": MAX_PRIORITY,
        "task_default_queue_type": "classic",
        "task_create_missing_queue_type": "classic",
        "task_create_missing_queue_exchange_type": None,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """What every process shares: the client's configuration, and the base of every role's."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": _result_backend(settings.result_backend),
        # Read by Celery's Sentinel backend only (a sentinel:// result_backend).
        "result_backend_transport_options": {"master_name": settings.redis_sentinel_master},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A job is acked only after it finished; a killed worker's job goes back to its queue.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Cancelling needs a pool that can kill a job (the threads pool cannot: it raises and
        # the consumer does not recover). A job still running when the broker connection
        # drops finishes; its redelivered copy is dropped by the slot's duplicate guard.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Queues are created on first use (one per model x tier, one per instance), all with
        # the same arguments (app.queues.queue_arguments).
        "task_create_missing_queues": True,
        **_queue_kind(settings),
        "task_default_priority": 5,
        "task_default_queue": f"{settings.namespace}.default",
        "result_expires": settings.result_expires,
        # The router stage of a job stores no result (it is not the job's answer), but if it
        # fails, the caller must still hear about it.
        "task_store_errors_even_if_ignored": True,
        "result_extended": False,
        "result_backend_always_retry": True,
        "result_backend_thread_safe": True,
        "redis_backend_health_check_interval": 30,
        "broker_connection_retry_on_startup": True,
        # Notice a dead broker connection in seconds, not minutes (a busy router may not
        # read its socket until AMQP heartbeats say the peer is gone).
        "broker_heartbeat": 10,
        # Without publisher confirms, a publish on a connection the broker just dropped can
        # vanish without an error: a lost job. With them, it is retried or it raises.
        "broker_transport_options": {"confirm_publish": True},
        "worker_send_task_events": True,
        # Flower shows a job as soon as it is queued, not only once a worker takes it.
        "task_send_sent_event": True,
        "worker_disable_rate_limits": True,
        "worker_hijack_root_logger": False,
    }


#: Workers publish the next stage of jobs they hold: through a broker restart, keep trying
#: (about a minute) rather than fail a job that is only waiting for the broker.
WORKER_PUBLISH_RETRY_POLICY = {
    "max_retries": 40,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


def _worker_config(settings: Settings, threads: int) -> dict[str, Any]:
    """Every Corral worker: a thread per job it may hold, and patience with the broker when
    publishing a job's next stage (prefetch 1 and task events are everyone's: celery_config)."""
    return celery_config(settings) | {
        "worker_pool": "threads",
        "worker_concurrency": threads,
        "task_publish_retry_policy": WORKER_PUBLISH_RETRY_POLICY,
        # A broker node going away answers the consumer's restart with channel errors for a
        # while: NOT_FOUND for a classic queue whose node is down, RESOURCE_LOCKED for the
        # worker's own exclusive mailbox queue until the broker drops the old connection.
        # Celery counts them unrecoverable and the worker exits (seen in the multi-host bed:
        # every router and instance worker gone after one node's restart); retried, the
        # consumer comes back once the queue can be consumed again.
        "broker_channel_error_retry": True,
    }


def router_config(settings: Settings, threads: int) -> dict[str, Any]:
    """``corral router``: ``threads`` jobs held at once, each waiting for a slot.

    The router stage is not the job's outcome: only the instance worker reports the job's
    states (received, started, retried, succeeded, failed) to Flower, so a job routed but not
    yet run never looks finished; and the job was reported sent by its caller already.
    """
    return _worker_config(settings, threads) | {
        "task_send_sent_event": False,
        "task_annotations": {INFER_TASK: {"send_events": False}},
    }


def instance_worker_config(settings: Settings, parallelism: int) -> dict[str, Any]:
    """``corral worker``: one thread per request the instance runs at once (its parallelism)."""
    return _worker_config(settings, parallelism)


def beat_config(settings: Settings) -> dict[str, Any]:
    """``corral beat``: the client's configuration and the ``schedules`` setting's entries."""
    return celery_config(settings) | {"beat_schedule": beat_schedule(settings.schedules)}


def use_role_config(config: dict[str, Any]) -> None:
    """Give this process its role's configuration: ``corral router``, ``worker`` and ``beat``
    call this once, before the worker or beat starts; nothing changes it after."""
    celery_app.config_from_object(config, force=True)


#: Settings that every Corral process must share, and that a job's safety rests on: a web
#: framework's settings cannot change them (see :func:`configure_from`).
REQUIRED_SETTINGS = frozenset(
    {
        # Where the routers, the instance workers and the results are.
        "broker_url",
        "result_backend",
        # Workers accept JSON only, and typed errors travel as JSON.
        "task_serializer",
        "result_serializer",
        "accept_content",
        "result_accept_content",
        # RabbitMQ refuses a queue redeclared with other arguments; route and instance
        # queues are declared on first use.
        "task_queue_max_priority",
        "task_create_missing_queues",
        "task_default_queue_type",
        "task_create_missing_queue_type",
        "task_create_missing_queue_exchange_type",
        # A job is neither lost with its worker nor held back by one.
        "task_acks_late",
        "task_reject_on_worker_lost",
        "worker_prefetch_multiplier",
        # The caller hears of a router stage that failed.
        "task_store_errors_even_if_ignored",
        # Publisher confirms (merged into the framework's other transport options).
        "broker_transport_options",
    }
)


def create_app(settings: Settings | None = None) -> Celery:
    # Task events go out unconfirmed: they are monitoring, not jobs (app.observe.events).
    app = Celery("corral", include=["tasks", "tasks.batch"], events="app.observe.events:Events")
    app.config_from_object(celery_config(settings or get_settings()))
    return app


celery_app = create_app()


#: Identifies configure_from's receiver, so that configuring again replaces it.
_KEEP_CORRAL = "corral.configure_from"


def configure_from(obj: Any, namespace: str | None = None, *, app: Celery | None = None) -> Celery:
    """Configure Corral's Celery app from a web framework's settings, keeping Corral's own.

    ``obj`` and ``namespace`` are what ``config_from_object`` takes: ``"django.conf:settings"``
    with ``namespace="CELERY"``, or a Flask app's ``app.config["CELERY"]``. Celery's
    ``config_from_object`` replaces the app's configuration source, which alone would drop
    everything Corral set. Here the framework's settings override Corral's other settings
    (events, heartbeats, result expiry...), Corral's :data:`REQUIRED_SETTINGS` always apply, and
    a framework value that contradicts one is logged as a warning and ignored. As with
    ``config_from_object``, the framework's settings are read when the configuration is first
    used (at once if it already was), so a Django project may call this while its settings
    are still loading.
    """
    app = app or celery_app
    corral = celery_config(get_settings())

    def keep_corral(source: ConfigurationView, **_: Any) -> None:
        # celery-types is wrong twice here: ConfigurationView takes a list of default mappings
        # (it chains them), and Celery sets app.namespace in __init__ (config_from_object too).
        framework = ConfigurationView(
            {},
            [app.loader.conf],  # type: ignore[arg-type]
            prefix=app.namespace,  # type: ignore[attr-defined]
        )
        source.update(_over_framework(corral, framework))

    # Connected first: config_from_object loads at once if the app is already configured.
    app.on_after_configure.disconnect(dispatch_uid=_KEEP_CORRAL)
    app.on_after_configure.connect(keep_corral, weak=False, dispatch_uid=_KEEP_CORRAL)
    app.config_from_object(obj, namespace=namespace)
    return app


def _over_framework(corral: dict[str, Any], framework: ConfigurationView) -> dict[str, Any]:
    """What goes over the framework's settings: Corral's required settings, and its other
    settings where the framework has none."""
    over: dict[str, Any] = {}
    for key, ours in corral.items():
        theirs = framework.get(key)
        name = f"{framework.prefix}{key.upper()}" if framework.prefix else key
        if key == "broker_transport_options":
            theirs = theirs or {}
            for option, value in ours.items():
                _warn_if_differs(f"{name}[{option!r}]", theirs.get(option), value)
            over[key] = {**theirs, **ours}
        elif key in REQUIRED_SETTINGS:
            _warn_if_differs(name, theirs, ours)
            over[key] = ours
        elif theirs is None:
            over[key] = ours
    return over


def _warn_if_differs(name: str, theirs: Any, ours: Any) -> None:
    if isinstance(theirs, tuple | list) and isinstance(ours, tuple | list):
        theirs, ours = list(theirs), list(ours)
    if theirs is not None and theirs != ours:
        log.warning(
            "%s=%r is ignored: every Corral process needs %r (see REQUIRED_SETTINGS in"
            " app.celery_app; the broker and backend are CORRAL_BROKER_URL, CORRAL_RESULT_BACKEND)",
            name,
            theirs,
            ours,
        )
