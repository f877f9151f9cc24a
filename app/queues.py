"""Queue names: the one place that says where a job waits.

* ``<ns>.route.<model>.<tier>``: jobs waiting for a slot, in priority order (router consumes).
* ``<ns>.instance.<name>``: jobs holding a slot on that instance (its worker consumes).
* ``<ns>.dead``: dead letters, one JSON record per job that gave up.
* ``<ns>.batch``: scheduled batch runs and their result callbacks (``tasks.batch``); the batch
  router consumes it, so they never take a thread from a more urgent tier.

All are declared by Celery on first use with ``task_queue_max_priority``, so their arguments
agree in every process (see ``app.celery_app``).
"""

from __future__ import annotations

from app.settings import Tier, get_settings


def route_queue(model: str, tier: Tier) -> str:
    return f"{get_settings().namespace}.route.{model}.{tier}"


def instance_queue(instance: str) -> str:
    return f"{get_settings().namespace}.instance.{instance}"


def dead_letter_queue() -> str:
    return f"{get_settings().namespace}.dead"


def batch_queue() -> str:
    return f"{get_settings().namespace}.batch"
