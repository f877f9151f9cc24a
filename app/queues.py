"""Queue names: the one place that says where a job waits.

* ``<ns>.route.<model>.<tier>``: jobs waiting for a slot, in priority order (router consumes).
* ``<ns>.instance.<name>``: jobs holding a slot on that instance (its worker consumes).
* ``<ns>.dead``: dead letters, one JSON record per job that gave up.
* ``<route queue>.delay.<n>s``: jobs a rate limit holds back, for n seconds; RabbitMQ then
  dead-letters them back to their route queue (no consumer, nothing held in a worker).
* ``<ns>.batch``: scheduled batch runs and their result callbacks (``tasks.batch``); the batch
  router consumes it, so they never take a thread from a more urgent tier.

All are declared by Celery on first use with ``task_queue_max_priority``, so their arguments
agree in every process (see ``app.celery_app``).
"""

from __future__ import annotations

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
            "x-message-ttl": seconds * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        },
    )
