"""Task events go out unconfirmed on their own connection; jobs keep publisher confirms."""

from __future__ import annotations

from app.celery_app import celery_app
from app.observe.events import UnconfirmedEventDispatcher


def test_a_workers_event_connection_does_not_wait_for_confirms() -> None:
    connection = celery_app.connection_for_write()
    dispatcher = celery_app.events.Dispatcher(connection, enabled=False)
    try:
        assert isinstance(dispatcher, UnconfirmedEventDispatcher)
        assert dispatcher.connection.transport_options["confirm_publish"] is False
        with celery_app.connection_for_write() as jobs:
            assert jobs.transport_options["confirm_publish"] is True
    finally:
        connection.release()


def test_an_open_connection_is_left_as_it_is() -> None:
    with celery_app.connection_for_write() as connection:
        connection.connect()
        UnconfirmedEventDispatcher(connection, enabled=False)
        assert connection.transport_options["confirm_publish"] is True
