"""A worker whose queue consumer the broker cancelled restarts it, even when Celery missed the
notice.

RabbitMQ cancels the consumers of a queue it can no longer serve (``basic.cancel``: a classic
queue whose node went down, a deleted queue). py-amqp raises ``ConsumerCancelled`` where the
frame is read, and Celery restarts its consumer when the error reaches its event loop. Read
elsewhere, it is lost: Celery's first drain after a reconnect (``celery.worker.loops._quick_drain``)
drops every error without an ``errno``, and so do the callbacks of its acks. The consumer is
gone, the connection is fine, and the worker idles for good with jobs waiting in its queue
(seen in the multi-host bed: an instance worker that reconnected just as the classic queues'
node stopped).

:class:`ConsumerWatch` looks every ``CHECK_S`` whether each queue the worker consumes still has
its consumer on the channel (py-amqp drops a cancelled consumer's tag before it raises), and if
one is gone raises ``ConsumerCancelled`` from the event loop's timer, where Celery handles it:
the consumer restarts, declares its queues and consumes again.

Hooks: ``start`` (the consumer's connection and task consumer are up), ``stop`` and
``shutdown`` (the check is cancelled with the connection it watches). Added to every Corral
worker, router and instance worker (``corral router``, ``corral worker``).
"""

from __future__ import annotations

from typing import Any

from amqp.exceptions import ConsumerCancelled
from celery import bootsteps

#: How often the consumer is checked: an in-memory look at the channel, no I/O.
CHECK_S = 2.0


class ConsumerWatch(bootsteps.StartStopStep):
    """Restart the consumer when a queue it consumes lost its consumer tag."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        self.tref = c.timer.call_repeatedly(CHECK_S, self.check, (c,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop

    @staticmethod
    def check(c: Any) -> None:
        consumer = c.task_consumer
        if consumer is None or c.connection is None:
            return
        # kombu keeps the tag of each queue it consumes; py-amqp forgets a tag the broker
        # cancelled (``Channel._remove_tag``) before raising.
        live = consumer.channel.callbacks
        lost = [q for q, tag in consumer._active_tags.items() if tag not in live]
        if lost:
            raise ConsumerCancelled(f"the broker cancelled the consumer of {', '.join(lost)}")
