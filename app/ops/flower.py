"""Flower as Corral starts it: ``corral flower --conf=flower/flowerconfig.py [...]``.

Flower's *Broker* tab (and ``/api/queues/length``) lists only the queues of the workers
Flower has inspected: once at its start, and again each time the *Workers* tab is opened.
Started next to the workers (``corral up``), it inspects before any of them answers, so the
tab said "No queue data is available" until someone opened *Workers*; and the dead-letter
queue, which no worker consumes, was never listed at all. Flower has no setting for the
list, so this launcher adds Corral's own queues to what Flower learned from the workers:
each route queue of every model the fleet serves or is configured for (one per tier), each
instance's queue, the batch queue and the dead-letter queue. They are read from Redis at
each page view, so a model or instance added later shows up too; a queue RabbitMQ does not
have (yet) is left out by Flower itself.

``celery -A app.celery_app flower`` still works, with Flower's own list.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import redis

from app.celery_app import celery_app
from app.queues import batch_queue, dead_letter_queue, instance_queue, route_queue
from app.settings import TIERS, get_settings
from app.state.fleet import fleet_state

log = logging.getLogger(__name__)


def corral_queues() -> set[str]:
    """Every queue Corral publishes to, for the fleet as Redis and the settings know it."""
    settings = get_settings()
    models = {m for i in settings.instances for m in (i.models or ())}
    instances = {i.name for i in settings.instances}
    try:
        fleet = fleet_state()
        models |= fleet.instances.served_models()
        instances |= set(fleet.instances.instance_names())
    except redis.RedisError as exc:  # the page still shows what the settings name
        log.warning("Corral's queues from Redis unavailable: %s", exc)
    return {
        *(route_queue(m, t) for m in models for t in TIERS),
        *(instance_queue(n) for n in instances),
        batch_queue(),
        dead_letter_queue(),
    }


def install() -> None:
    """Make Flower's queue list the workers' queues plus Corral's (idempotent)."""
    from flower.views import BaseHandler

    learned: Callable[[BaseHandler], list[str]] = BaseHandler.get_active_queue_names
    if getattr(learned, "corral", False):
        return

    def get_active_queue_names(self: BaseHandler) -> list[str]:
        return sorted(set(learned(self)) | corral_queues())

    get_active_queue_names.corral = True  # type: ignore[attr-defined]
    BaseHandler.get_active_queue_names = get_active_queue_names


def main(argv: list[str] | None = None) -> None:
    install()
    celery_app.start(["flower", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
