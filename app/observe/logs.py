"""Log lines that name their job, in every Corral process.

Every record gets ``job_id`` (the Celery task being run on this thread, or the job the
gateway request is handling, else ``-``) and ``role`` (``gateway``, ``router-normal``,
``worker-gpu-1``...), so one ``grep <job id>`` over all logs follows a job from the gateway
through the router to the instance worker. ``CORRAL_LOG_FORMAT=json`` writes one JSON
object per line (python-json-logger) for log shippers.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from celery import signals
from celery._state import get_current_task
from pythonjsonlogger.json import JsonFormatter

from app.settings import get_settings

#: The job a gateway request is handling (set once its id is known).
current_job: ContextVar[str | None] = ContextVar("corral_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(role)s %(name)s [job %(job_id)s] %(message)s"
JSON_FIELDS = ["asctime", "levelname", "role", "name", "job_id", "message"]

_role = "corral"


class JobContext(logging.Filter):
    """Adds ``job_id`` and ``role`` to every record passing through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", None):
            record.job_id = (
                current_job.get() or _celery_job_line(record) or _running_task_id() or "-"
            )
        record.role = _role
        return True


def _celery_job_line(record: logging.LogRecord) -> str | None:
    # Celery's "received", "succeeded", "retry" and failure lines carry the job as ``data``,
    # and some are logged outside the task's thread.
    data = getattr(record, "data", None)
    if not isinstance(data, dict):
        data = record.args if isinstance(record.args, dict) else {}
    job = data.get("id")
    return job if isinstance(job, str) else None


def _running_task_id() -> str | None:
    # Celery keeps the current task per thread, so this is right under the threads pool too.
    task = get_current_task()
    return getattr(task.request, "id", None) if task is not None else None


def formatter() -> logging.Formatter:
    if get_settings().log_format == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
    return logging.Formatter(TEXT_FORMAT)


def dress(handler: logging.Handler) -> None:
    """Give a handler Corral's format and the job context."""
    handler.setFormatter(formatter())
    if not any(isinstance(f, JobContext) for f in handler.filters):
        handler.addFilter(JobContext())


def configure(role: str, level: str = "INFO") -> None:
    """For a process that sets up logging itself (the gateway, the CLI tools)."""
    global _role
    _role = role
    logging.basicConfig(level=level.upper())
    for handler in logging.getLogger().handlers:
        dress(handler)


def set_role(role: str) -> None:
    """For Celery workers, whose logging Celery sets up (see the signal handlers below)."""
    global _role
    _role = role


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _dress_celery_handlers(logger: logging.Logger, **_: Any) -> None:
    # Replaces Celery's own formats (its task format names the task only in task loggers).
    for handler in logger.handlers:
        dress(handler)
