"""Queue names: the one place that says where a job waits.

* ``<ns>.route.<model>.<tier>``: jobs waiting for a slot, in priority order (router consumes).
* ``<ns>.instance.<name>``: jobs holding a slot on that instance (its worker consumes).
* ``<ns>.dead``: dead letters, one JSON record per job that gave up.
* ``<route queue>.delay.<n>s``: jobs a rate limit holds back, for n seconds; RabbitMQ then
  dead-letters them back to their route queue (no consumer, nothing held in a worker).
* ``<ns>.batch``: scheduled batch runs and their result callbacks (``tasks.batch``); the batch
  router consumes it, so they never take a thread from a more urgent tier.

All are declared on first use with :func:`queue_arguments`, so their arguments agree in every
process (RabbitMQ refuses a redeclaration with others; ``app.celery_app`` gives Celery the same).

The ``queue_type`` setting picks the kind of queue:

* ``classic`` (the default): priority queues, 0-9, strict (a higher priority is always
  delivered first). Each lives on one RabbitMQ node: durable, so it survives that node's
  restart, but unavailable while the node is down.
* ``quorum``: replicated on a majority of the cluster's nodes (Raft); they go on serving while
  a minority is down. RabbitMQ 3.x refuses ``x-max-priority`` on them and keeps no message
  priority: within one queue, delivery is in publish order. Corral's order survives in what
  matters most: tiers are separate queues with routers of their own, and the jobs a router
  holds wait for slots in deadline order (tier, priority, age: ``app.jobs.router``), so the
  order is FIFO only among the jobs of one model and tier not yet taken by a router thread.
  Retry countdowns use Celery's native delayed delivery (quorum queues behind topic
  exchanges), so a job waiting out its backoff waits in the broker, not in a worker.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, cast

from amqp.exceptions import NotFound
from kombu import Connection, Exchange, Queue
from kombu.transport.base import StdChannel

from app.settings import Tier, get_settings

#: Seconds to reach RabbitMQ before a depth reading gives up (a Prometheus scrape waits 10).
BROKER_CONNECT_TIMEOUT = 2.0


class QueueDeclareOk(Protocol):
    """The reply to a queue declare (py-amqp's ``queue_declare_ok_t``)."""

    queue: str
    message_count: int
    consumer_count: int


class FetchedMessage(Protocol):
    """A message fetched by ``basic_get`` (py-amqp's ``Message``). It always carries its
    delivery tag: py-amqp types ``Message.delivery_tag`` optional, for a message not received."""

    body: bytes | str
    properties: dict[str, Any]

    @property
    def delivery_tag(self) -> int: ...


class BrokerChannel(Protocol):
    """The queue methods of a channel to RabbitMQ (py-amqp's ``Channel``, which kombu's
    pyamqp transport uses), as Corral calls them."""

    def queue_declare(self, queue: str, *, passive: bool) -> QueueDeclareOk: ...

    def queue_delete(self, queue: str) -> int: ...

    def basic_get(self, queue: str) -> FetchedMessage | None: ...

    def basic_ack(self, delivery_tag: int) -> None: ...

    def close(self) -> None: ...


def broker_channel(channel: StdChannel) -> BrokerChannel:
    """``channel`` with its queue methods: kombu types a connection's channels as its
    abstract ``StdChannel``, which declares none of them."""
    return cast(BrokerChannel, channel)


#: Priority levels inside one classic tier queue (RabbitMQ recommends few; 0-9 as Celery's).
MAX_PRIORITY = 9


def queue_arguments(*, priority: bool = True) -> dict[str, Any]:
    """The arguments a Corral queue is declared with, per the ``queue_type`` setting; a classic
    queue without ``priority`` is a plain FIFO one."""
    if get_settings().queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return {"x-max-priority": MAX_PRIORITY} if priority else {}


def broker_countdown(seconds: float) -> float:
    """A retry's countdown as the broker can keep it: with quorum queues Celery's native
    delayed delivery counts whole seconds, at least one (it refuses less)."""
    if seconds > 0 and get_settings().queue_type == "quorum":
        return float(max(1, math.ceil(seconds)))
    return seconds


def route_queue(model: str, tier: Tier) -> str:
    return f"{get_settings().namespace}.route.{model}.{tier}"


def instance_queue(instance: str) -> str:
    return f"{get_settings().namespace}.instance.{instance}"


def dead_letter_queue() -> str:
    return f"{get_settings().namespace}.dead"


def batch_queue() -> str:
    return f"{get_settings().namespace}.batch"


def queue_counts(queues: list[str]) -> dict[str, tuple[int, int]]:
    """(ready, consumers) per queue by passive declare; (0, 0) for a queue not declared yet.

    About a millisecond a queue; no management plugin needed.
    """
    counts: dict[str, tuple[int, int]] = {}
    with Connection(get_settings().broker_url, connect_timeout=BROKER_CONNECT_TIMEOUT) as conn:
        conn.connect()
        for queue in queues:
            # A passive declare of a missing queue closes its channel: one channel each.
            channel = broker_channel(conn.channel())
            try:
                declared = channel.queue_declare(queue, passive=True)
                ready, consumers = declared.message_count, declared.consumer_count
            except NotFound:
                ready, consumers = 0, 0
            finally:
                channel.close()
            counts[queue] = (ready, consumers)
    return counts


def delay_queue(target: str, seconds: int) -> Queue:
    """Where a job waits ``seconds`` before RabbitMQ moves it back to the ``target`` queue.

    Every message of the queue has the same time to live, so they expire in order, at the
    head: a classic TTL + dead-letter delay that keeps the job durable in the broker.
    """
    name = f"{target}.delay.{seconds}s"
    return Queue(
        name,
        Exchange(name, type="direct"),
        routing_key=name,
        queue_arguments={
            # FIFO: the messages expire at the head in the order they came.
            **queue_arguments(priority=False),
            "x-message-ttl": seconds * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        },
    )
