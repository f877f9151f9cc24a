"""The one Celery app, configured from Corral's settings (the cookiecutter-django shape).

Every process imports this module, so queue arguments (``x-max-priority``) are declared
identically everywhere: RabbitMQ refuses a redeclaration with different arguments.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.settings import Settings, get_settings

#: Priority levels inside one tier queue (RabbitMQ recommends few levels; 0-9 matches Celery's).
MAX_PRIORITY = 9


#: Workers publish the next stage of jobs they hold: through a broker restart, keep trying
#: (about a minute) rather than fail a job that is only waiting for the broker.
WORKER_PUBLISH_RETRY_POLICY = {
    "max_retries": 40,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


def use_worker_publish_policy(app: Celery) -> None:
    app.conf.task_publish_retry_policy = WORKER_PUBLISH_RETRY_POLICY


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
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
        # the same priority argument.
        "task_create_missing_queues": True,
        "task_queue_max_priority": MAX_PRIORITY,
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


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("corral", include=["tasks"])
    app.config_from_object(celery_config(settings or get_settings()))
    return app


celery_app = create_app()
