"""Fleet gauges, read at scrape time: the instances from Redis, the queues from RabbitMQ.

These describe the fleet as a whole, not one process, so they are read by the exporter when
Prometheus scrapes rather than kept by any worker: the instances' slots and health from the
same Redis snapshot the routers rank (``app.state.instances``), and queue depths by passive
``queue_declare`` (exact ready counts, no management plugin, about a millisecond each). A
source that does not answer is reported by ``corral_metrics_source_up`` instead of failing
the whole scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import redis
from amqp.exceptions import AMQPError
from kombu.exceptions import OperationalError
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.policy.degradation import degradation
from app.queues import dead_letter_queue, queue_counts, route_queue
from app.settings import TIERS, get_settings
from app.state.fleet import fleet_state
from routing import FleetSnapshot

log = logging.getLogger(__name__)


class FleetCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        source_up = GaugeMetricFamily(
            "corral_metrics_source_up",
            "Whether the exporter could read a source at this scrape (redis, rabbitmq).",
            labels=["source"],
        )
        models = {m for i in get_settings().instances for m in (i.models or ())}
        try:
            fleet = fleet_state()
            snapshot = fleet.instances.snapshot()
            models |= fleet.instances.served_models()
            waiting = {m: fleet.slots.waiting(m) for m in sorted(models)}
            level = degradation().level(fresh=True)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unreadable: %s", exc)
            source_up.add_metric(["redis"], 0)
        else:
            source_up.add_metric(["redis"], 1)
            yield from _instance_families(snapshot)
            yield _gauge(
                "corral_degradation_level",
                "0 normal, 1 batch yields, 2 normal yields too, 3 new normal jobs refused.",
                [],
                [((), level)],
            )
            yield _gauge(
                "corral_waiting_jobs",
                "Jobs a router thread holds while they wait for a free slot, per model.",
                ["model"],
                [((m,), n) for m, n in waiting.items()],
            )
        try:
            queues = queue_counts(
                [dead_letter_queue(), *(route_queue(m, t) for m in models for t in TIERS)]
            )
        except (OSError, AMQPError, OperationalError) as exc:
            log.warning("metrics: RabbitMQ unreadable: %s", exc)
            source_up.add_metric(["rabbitmq"], 0)
        else:
            source_up.add_metric(["rabbitmq"], 1)
            per_queue = [((m, t), queues[route_queue(m, t)]) for m in sorted(models) for t in TIERS]
            yield _gauge(
                "corral_queue_depth",
                "Jobs ready in a model/tier queue, not yet taken by a router thread.",
                ["model", "tier"],
                ((labels, ready) for labels, (ready, _) in per_queue),
            )
            yield _gauge(
                "corral_queue_consumers",
                "Consumers of a model/tier queue (0: no router serves it).",
                ["model", "tier"],
                ((labels, consumers) for labels, (_, consumers) in per_queue),
            )
            yield _gauge(
                "corral_dead_letter_queue_depth",
                "Dead letters waiting in the dead-letter queue.",
                [],
                [((), queues[dead_letter_queue()][0])],
            )
        yield source_up


def _gauge(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[tuple[str, ...], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _instance_families(snap: FleetSnapshot) -> list[GaugeMetricFamily]:
    per = [((i.name,), i) for i in snap.instances]
    return [
        _gauge(
            "corral_instance_up",
            "1 if the instance gets jobs: healthy, heartbeat fresh, not cooling down.",
            ["instance"],
            ((k, float(i.up(snap.now))) for k, i in per),
        ),
        _gauge(
            "corral_instance_healthy",
            "1 if the instance answered its worker's last health probe (/api/ps).",
            ["instance"],
            ((k, float(i.healthy)) for k, i in per),
        ),
        _gauge(
            "corral_instance_enabled",
            "0 while the instance is drained (``corral fleet drain``): it gets no new jobs.",
            ["instance"],
            ((k, float(i.enabled)) for k, i in per),
        ),
        _gauge(
            "corral_instance_capacity",
            "Slots of the instance (its OLLAMA_NUM_PARALLEL).",
            ["instance"],
            ((k, i.capacity) for k, i in per),
        ),
        _gauge(
            "corral_instance_jobs_in_flight",
            "Slots held by jobs: reserved, queued on the instance or running.",
            ["instance"],
            ((k, i.in_flight) for k, i in per),
        ),
        _gauge(
            "corral_instance_free_slots",
            "Slots a router may reserve now.",
            ["instance"],
            ((k, i.free) for k, i in per),
        ),
        _gauge(
            "corral_instance_service_seconds_ewma",
            "Moving average of the instance's service time, as the routers rank it.",
            ["instance"],
            ((k, i.ewma_ms / 1000) for k, i in per),
        ),
        _gauge(
            "corral_instance_breaker_state",
            "1 for the circuit breaker's current state (closed, half_open, open), else 0.",
            ["instance", "state"],
            (
                ((i.name, state), float(i.breaker == state))
                for i in snap.instances
                for state in BREAKER_STATES
            ),
        ),
    ]


BREAKER_STATES = ("closed", "half_open", "open")
