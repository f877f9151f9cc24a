"""Queue names: the one place that says where a job waits.

* ``<ns>.route.<model>.<tier>``: jobs waiting for a slot, in priority order (router consumes).
* ``<ns>.instance.<name>``: jobs holding a slot on that instance (its worker consumes).
* ``<ns>.dead``: dead letters, one JSON record per job that gave up.

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
