"""What the fleet dashboard shows, read from Redis and RabbitMQ (blocking: thread pool only).

The instances come from the same Redis snapshot the routers rank (``app.state.instances``), plus
each instance's count of finished jobs (the rates are computed by the caller, between
reads); the queue depths from RabbitMQ by passive declare over one long-lived connection;
the failures from ``app.state.failures``. Nothing here asks a worker anything (no Celery
``inspect()``): a read is a few Redis round trips and one declare per queue.
"""

from __future__ import annotations

from typing import Literal

from amqp.exceptions import AMQPError, NotFound
from kombu import Connection
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from app.queues import BrokerChannel, broker_channel, dead_letter_queue, route_queue
from app.settings import TIERS, get_settings
from app.state import failures as recent_failures
from app.state.failures import Failure
from app.state.fleet import fleet_state
from routing import InstanceStats

#: Seconds to reach RabbitMQ before the queues are reported unreadable.
BROKER_CONNECT_TIMEOUT = 2.0
#: Failures shown.
FAILURES_SHOWN = 15

Status = Literal["up", "drained", "cooling down", "unhealthy", "no heartbeat"]


class InstanceRow(BaseModel):
    name: str
    status: Status
    breaker: str
    in_flight: int
    capacity: int
    models: list[str]
    loaded: list[str]
    #: The models the placement plan wants it to hold (None: no plan made lately).
    planned: list[str] | None = None
    ewma_ms: float
    recent_errors: int
    completed: int
    jobs_per_s: float = 0.0


class QueueRow(BaseModel):
    model: str
    #: Jobs ready in RabbitMQ per tier (not yet taken by a router thread).
    ready: dict[str, int]
    #: Jobs router threads hold while they wait for a free slot (all tiers).
    waiting: int


class DashboardData(BaseModel):
    at: float
    namespace: str
    instances: list[InstanceRow]
    #: None when RabbitMQ could not be read (``broker_error`` says why).
    queues: list[QueueRow] | None
    dead_letters: int | None
    broker_error: str | None = None
    jobs_per_s: float = 0.0
    failures: list[Failure]


def status(stats: InstanceStats, now: float) -> Status:
    """The one word an operator needs first, worst first."""
    if now >= stats.expires_at:
        return "no heartbeat"
    if not stats.healthy:
        return "unhealthy"
    if stats.down_until > now:
        return "cooling down"
    return "up" if stats.enabled else "drained"


class QueueDepths:
    """Ready counts by passive declare, on one connection and channel kept between reads.

    Not thread-safe: the dashboard's feed reads under a lock.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Connection | None = None
        self._channel: BrokerChannel | None = None

    def read(self, queues: list[str]) -> dict[str, int]:
        try:
            return {queue: self._ready(queue) for queue in queues}
        except (OSError, AMQPError, OperationalError):
            self.close()  # the next read reconnects
            raise

    def _ready(self, queue: str) -> int:
        if self._channel is None:
            if self._conn is None:
                self._conn = Connection(self.url, connect_timeout=BROKER_CONNECT_TIMEOUT)
            self._channel = broker_channel(self._conn.channel())
        try:
            return self._channel.queue_declare(queue, passive=True).message_count
        except NotFound:
            # The broker closes a channel whose passive declare failed: open another next.
            self._channel = None
            return 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.release()
        self._conn = self._channel = None


def read(depths: QueueDepths) -> DashboardData:
    """The fleet now, rates left at 0 (raises redis.RedisError if Redis is unreadable)."""
    settings = get_settings()
    fleet = fleet_state()
    snap = fleet.instances.snapshot()
    models = sorted(
        fleet.instances.served_models() | {m for i in settings.instances for m in (i.models or ())}
    )
    completed = fleet.instances.field([s.name for s in snap.instances], "completed")
    waiting = list(fleet.slots.waiting_per_model(models).values())
    planned = fleet.placement.read() or {}
    instances = [
        InstanceRow(
            name=s.name,
            status=status(s, snap.now),
            breaker=s.breaker,
            in_flight=s.in_flight,
            capacity=s.capacity,
            models=sorted(s.models),
            loaded=sorted(s.loaded),
            planned=planned.get(s.name),
            ewma_ms=round(s.ewma_ms, 1),
            recent_errors=s.recent_errors,
            completed=int(done or 0),
        )
        for s, done in zip(snap.instances, completed, strict=True)
    ]
    data = DashboardData(
        at=snap.now,
        namespace=settings.namespace,
        instances=instances,
        queues=None,
        dead_letters=None,
        failures=recent_failures.recent(FAILURES_SHOWN),
    )
    try:
        ready = depths.read(
            [dead_letter_queue(), *(route_queue(m, t) for m in models for t in TIERS)]
        )
    except (OSError, AMQPError, OperationalError) as exc:
        data.broker_error = f"RabbitMQ unreadable: {exc}"
        return data
    data.queues = [
        QueueRow(model=m, ready={t: ready[route_queue(m, t)] for t in TIERS}, waiting=n)
        for m, n in zip(models, waiting, strict=True)
    ]
    data.dead_letters = ready[dead_letter_queue()]
    return data
