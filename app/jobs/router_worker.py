"""The router worker: consumes the model/tier queues of one tier.

One router process per tier, because a worker consuming several queues takes them in turn,
without priority between them, and a router thread waiting for a slot for a batch job is a
thread an interactive job cannot use. The queues of models that appear later (a model pulled
onto an instance, a new instance) are added while the worker runs.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps
from celery.signals import worker_ready, worker_shutting_down
from kombu.transport.native_delayed_delivery import bind_queue_to_native_delayed_delivery_exchange

from app.jobs.placement import keep_planning
from app.jobs.router import shutting_down
from app.queues import batch_queue, route_queue
from app.settings import Tier, get_settings
from app.state.fleet import fleet_state

log = logging.getLogger(__name__)

#: Seconds between looks for newly served models.
WATCH_SECONDS = 2.0

_tier: Tier | None = None
#: The route queues the worker was started with (``configure``'s last answer).
_started_with: set[str] = set()


def configure(tier: Tier) -> list[str]:
    """Make this process the router of ``tier``; returns the queues to consume at start."""
    global _tier
    _tier = tier
    queues = [route_queue(m, tier) for m in sorted(_served_models())]
    if tier == "batch" and queues:
        # Scheduled batch runs and their result callbacks (tasks.batch) need a consumer;
        # the batch router's threads are the ones no more urgent job waits for. Only once a
        # model is served: until then `corral router` waits, and so does a batch run.
        queues.append(batch_queue())
    _started_with.clear()
    _started_with.update(queues)
    return queues


class PrefetchPerModel(bootsteps.StartStopStep):
    """Each route queue hands this router at most ``router_prefetch_per_model`` jobs at once
    (when set; off by default, see below).

    A router thread holds its job until a slot is free for it. With Celery's prefetch alone
    (the thread count) one model's backlog took every thread with jobs waiting for its busy
    instances, and a job of another model, whose instance had free slots, waited behind them:
    10 jobs of 0.1 s took 4.1 s behind 80 jobs of another model at 32 threads, their instance
    idle meanwhile. Capped per queue, a backlog holds a few threads and the rest of it waits
    in the broker, in priority order.

    Hook: ``start``, after Celery's ``Tasks`` step set its prefetch and before the consumers
    start. Where the broker applies Celery's count to the whole channel (RabbitMQ 3 with
    classic queues), a count per consumer is added beside it (RabbitMQ applies both); where
    it applies it per consumer (RabbitMQ 4, quorum queues), Celery's count becomes the cap.

    Off by default: embedding jobs ride in a waiting job's batched call (``embed_batching``),
    and with 4 jobs per queue a test's 48 embeddings took 30 calls instead of under 24.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        global _capped
        cap = get_settings().router_prefetch_per_model
        if cap is None:
            return
        # The pool's threads, not the setting: ``corral router --concurrency`` overrides it.
        _capped = (cap, c.pool.num_processes)
        _crowded(len(c.task_consumer.queues))
        if c.qos_global:
            c.task_consumer.channel.basic_qos(0, cap, False)
        else:
            c.qos.value = c.initial_prefetch_count = cap
            c.qos.set(cap)


#: (jobs a queue may hand this router, its threads), once the consumer started with a cap.
_capped: tuple[int, int] | None = None


def _crowded(queues: int) -> None:
    """Warn when the route queues could hold every router thread between them."""
    if _capped is not None and queues * _capped[0] > _capped[1]:
        log.warning(
            "%d queues x router_prefetch_per_model %d > %d router threads: one model's "
            "backlog may hold the threads another model's free slots need",
            queues,
            *_capped,
        )


def _served_models() -> set[str]:
    configured = {m for i in get_settings().instances for m in (i.models or ())}
    return fleet_state().instances.served_models() | configured


def _watch_models(tier: Tier, hostname: str, stop: threading.Event) -> None:
    from app.celery_app import celery_app

    # The queues the worker consumes, not those of the models served by now: a model first
    # served between the worker's start and this thread's would otherwise never be consumed.
    known = set(_started_with)
    while not stop.wait(WATCH_SECONDS):
        try:
            for model in _served_models():
                queue = route_queue(model, tier)
                if queue not in known:
                    _prepare(queue)
                    celery_app.control.add_consumer(queue, destination=[hostname], reply=False)
                    known.add(queue)
                    log.info("router %s now consumes %s", tier, queue)
                    _crowded(len(known))
        except Exception:
            log.exception("watching for new models failed")


def _prepare(queue: str) -> None:
    """Make a route queue added at run time what the worker's own would have been.

    Celery's ``add_consumer`` declares a queue it does not know yet as a plain direct one;
    looking it up first creates it as every Corral queue is (``app.queues``). With quorum
    queues, a retry's countdown waits in Celery's native delayed-delivery exchanges, which
    hand a message only to a queue bound to them: the worker binds the queues it starts
    with (Celery's ``DelayedDelivery`` step), this binds the ones added since.
    """
    from app.celery_app import celery_app

    declared = celery_app.amqp.queues[queue]
    if get_settings().queue_type == "quorum":
        with celery_app.connection_for_write() as connection:
            declared(connection.default_channel).declare()  # its exchange, to bind
            bind_queue_to_native_delayed_delivery_exchange(connection, declared)


def _evaluate_degradation(stop: threading.Event) -> None:
    from app.policy.degradation import degradation

    while not stop.wait(get_settings().heartbeat_interval):
        try:
            degradation().evaluate()
        except Exception:
            log.exception("evaluating the degradation level failed")


@worker_ready.connect
def _start_watch(sender: object = None, **_: object) -> None:
    if _tier is not None:
        hostname = getattr(sender, "hostname", "")
        threading.Thread(
            target=_watch_models, args=(_tier, hostname, shutting_down), daemon=True
        ).start()
        threading.Thread(target=_evaluate_degradation, args=(shutting_down,), daemon=True).start()
        threading.Thread(
            target=keep_planning, args=(shutting_down,), name="corral-placement", daemon=True
        ).start()


@worker_shutting_down.connect
def _stop_waiting(**_: object) -> None:
    shutting_down.set()
