"""Publishing a bulk call's messages with one wait for the broker's confirms per chunk.

Every Corral connection publishes with confirms (``confirm_publish``, ``app.celery_app``), so
that no job is reported submitted before the broker has it. py-amqp then waits for the
confirm of each message before sending the next: a round trip per job, and another for its
``task-sent`` event (Flower's "queued"), about a third of a client's time when it submits
jobs one by one. ``infer.submit_many`` publishes instead on a channel of its own, in confirm
mode but without waiting, and waits for the confirms of a whole chunk at once: the same
guarantee, a round trip per chunk. The chunk bounds what is unconfirmed at once, and the
acks left unread meanwhile.

A connection lost mid-call is retried as Celery retries one publish (``connection.ensure``
with ``task_publish_retry_policy``): the chunks already confirmed stand, and the rest is
published again from the first unconfirmed chunk, under the same task ids. A message the
broker had already taken is then queued twice, as with Celery's own retry of a publish
whose confirm was lost; the second copy of a job finds the first one's slot or result and
is dropped (see "Delivery guarantees" in the README).

Once those retries are spent, the call raises :class:`app.errors.BrokerUnavailable`
(:func:`broker_unavailable`), for ``infer.delay`` as for a bulk call: the gateway answers it
with a 503, a web app can do the same. A broker that goes silent (a partition) costs at most
``publish_timeout`` per attempt, never a hang.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from amqp.exceptions import MessageNacked, NotFound, RecoverableConnectionError
from celery import Celery
from kombu import Connection, Producer, Queue
from kombu.exceptions import OperationalError

from app.errors import BrokerUnavailable
from app.settings import get_settings

T = TypeVar("T")

#: Jobs sent before waiting for their confirms (a job is two messages: its own and its
#: task-sent event).
CHUNK = 500


@contextlib.contextmanager
def broker_unavailable() -> Iterator[None]:
    """Raise the broker's refusal, once kombu's retries are spent, as ``BrokerUnavailable``.

    kombu raises ``OperationalError`` when its retries on new connections are spent; the rest
    are what a publish not retried raises (a lost or silent connection, a refused message).
    ``NotFound``: the queue is classic and its node is down ("home node ... is down or
    inaccessible"); every queue a submit uses is declared on the way, so nothing else is
    missing."""
    try:
        yield
    except (OperationalError, RecoverableConnectionError, OSError, MessageNacked, NotFound) as exc:
        raise BrokerUnavailable(
            f"the broker did not take the job ({type(exc).__name__}: {exc}); it may not have"
            " been queued: retry, and check broker_url if it goes on"
        ) from exc


class Outlet:
    """What a send publishes with: the producer of the call's channel, and queues bound to it."""

    def __init__(self, app: Celery, channel: Any) -> None:
        self.app, self.channel, self.producer = app, channel, Producer(channel)
        self._queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        """The app's queue ``name`` (declared as every Corral process declares it), bound to
        this channel once: kombu otherwise copies an unbound queue to bind it, per message."""
        found = self._queues.get(name)
        if found is None:
            found = self._queues[name] = self.app.amqp.queues[name].bind(self.channel)
        return found


def publish_confirmed(app: Celery, sends: Sequence[Callable[[Outlet], T]]) -> list[T]:
    """Call each of ``sends`` with an outlet whose messages are confirmed together; return
    what they returned, in order, once the broker confirmed every message they published."""
    if not sends:
        return []
    # A pooled producer's connection (the app's pool), with a channel of this call's own.
    with app.producer_pool.acquire(block=True) as pooled:
        connection = cast(Connection, pooled.connection)  # a pooled producer always has one
        batch = _Batch(app, connection, sends)
        policy = app.conf.task_publish_retry_policy or {}
        try:
            with broker_unavailable():
                connection.ensure(batch, batch.publish_rest, **policy)()
        except BrokerUnavailable as exc:
            exc.published = len(batch.results)  # the chunks confirmed stand
            raise
        return batch.results


class _Batch:
    """A bulk call's sends, published chunk by chunk; ``results`` grows as chunks are confirmed."""

    def __init__(
        self, app: Celery, connection: Connection, sends: Sequence[Callable[[Outlet], T]]
    ) -> None:
        self.app, self.connection, self.sends = app, connection, sends
        self.results: list[Any] = []

    def revive(self, channel: Any) -> None:
        """kombu's ``ensure`` hands the new default channel over after reconnecting: unused,
        each attempt opens a channel of its own."""

    def publish_rest(self) -> None:
        # A pooled connection that an earlier call's spent retries closed would give no
        # channel (kombu's ``channel()`` reads a closed connection as None): open it again.
        self.connection.connect()
        channel = _ConfirmingChannel(self.connection.channel())
        confirm_timeout = get_settings().publish_timeout
        failed = True
        try:
            outlet = Outlet(self.app, channel.channel)
            while len(self.results) < len(self.sends):
                chunk = self.sends[len(self.results) : len(self.results) + CHUNK]
                sent = [send(outlet) for send in chunk]
                channel.wait_for_confirms(confirm_timeout)
                self.results += sent
            failed = False
        finally:
            if failed:  # the connection may be gone: closing its channel may fail too
                with contextlib.suppress(*self.connection.connection_errors):
                    channel.channel.close()
            else:
                channel.channel.close()


class _ConfirmingChannel:
    """A channel in confirm mode that does not wait for each confirm, and counts what it
    published, so that it can wait for all of it at once."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_select()
        # py-amqp makes basic_publish its waiting variant on every channel of a connection
        # with confirm_publish, by this same instance attribute; this one publishes and counts.
        channel.basic_publish = self._publish
        channel.events["basic_ack"].add(self._acked)
        channel.events["basic_nack"].add(self._nacked)
        self.published = 0
        self.unconfirmed: set[int] = set()
        self.nacked = False

    def _publish(self, *args: Any, **kwargs: Any) -> Any:
        # The broker numbers the messages of a channel in confirm mode 1, 2, 3...
        self.published += 1
        self.unconfirmed.add(self.published)
        return self.channel._basic_publish(*args, **kwargs)

    def _acked(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.unconfirmed = {t for t in self.unconfirmed if t > tag}
        else:
            self.unconfirmed.discard(tag)

    def _nacked(self, tag: int, multiple: bool) -> None:
        self.nacked = True
        self._acked(tag, multiple)

    def wait_for_confirms(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the broker did not confirm {len(self.unconfirmed)} messages in {timeout} s"
                )
            with contextlib.suppress(TimeoutError):  # checked against the deadline above
                self.channel.connection.drain_events(timeout=remaining)
        if self.nacked:
            raise MessageNacked("the broker refused messages of this call (basic.nack)")
