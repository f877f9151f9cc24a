"""Celery's task events (what Flower shows), sent without waiting for the broker's confirm.

Corral turns publisher confirms on for every connection (``broker_transport_options``): a job
published on a connection the broker just dropped must fail loudly, never vanish. A worker's
task events travel on a connection of their own, though, and they are monitoring, not jobs:
Celery already sends them transient (``delivery_mode=1``), so a broker restart loses them
anyway. Waiting for a confirm of each event batch blocked the worker's event loop, the thread
that also takes the next job off the queue, on every job (a profile of an instance worker under
a backlog: a quarter of its CPU went to flushing events, most of it the confirm round trip).

``Events`` is the ``events`` class of Corral's Celery app; its dispatcher takes the confirms
off a connection handed to it before that connection is opened. A dispatcher that publishes
on someone else's channel or producer (a client's ``task-sent`` event rides the job's own
confirmed publish) is left as it is.
"""

from __future__ import annotations

from typing import Any

from celery.app.events import Events as CeleryEvents
from celery.events.dispatcher import EventDispatcher


class UnconfirmedEventDispatcher(EventDispatcher):
    """An ``EventDispatcher`` whose own connection publishes without confirms."""

    def __init__(self, connection: Any = None, *args: Any, **kwargs: Any) -> None:
        # kombu connects lazily and reads transport_options when it does: a connection not
        # yet opened can still be told not to confirm. One already open is left alone.
        if connection is not None and not connection.connected:
            connection.transport_options = {
                **(connection.transport_options or {}),
                "confirm_publish": False,
            }
        super().__init__(connection, *args, **kwargs)


class Events(CeleryEvents):
    dispatcher_cls = "app.observe.events:UnconfirmedEventDispatcher"
