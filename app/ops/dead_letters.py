"""The dead-letter queue: jobs that gave up, with their error history.

Records are JSON messages on ``<ns>.dead`` (see ``app.jobs.executor.dead_letter``). Reading them
does not remove them: they are fetched unacknowledged and go back to the queue when the
connection closes. Replay submits the original request again, as a new job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from app.celery_app import celery_app
from app.queues import broker_channel, dead_letter_queue


def read_all(limit: int = 1000) -> list[dict[str, Any]]:
    """Every record, oldest first, left in the queue."""
    from amqp.exceptions import NotFound

    records: list[dict[str, Any]] = []
    with celery_app.connection_for_write() as conn:
        channel = broker_channel(conn.default_channel)
        try:
            while len(records) < limit and (msg := channel.basic_get(dead_letter_queue())):
                records.append(json.loads(msg.body))
        except NotFound:
            return []
    return records


def _consume(job_ids: set[str] | None, handle: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """Apply ``handle`` to matching records; a record is removed only if ``handle`` returned."""
    from amqp.exceptions import NotFound

    done = []
    with celery_app.connection_for_write() as conn:
        channel = broker_channel(conn.default_channel)
        try:
            while msg := channel.basic_get(dead_letter_queue()):
                record = json.loads(msg.body)
                if job_ids is None or record["job_id"] in job_ids:
                    done.append(handle(record))
                    channel.basic_ack(msg.delivery_tag)
        except NotFound:
            return []
    # Records left unacknowledged return to the queue when the connection closes.
    return done


def purge(job_ids: set[str] | None = None) -> list[str]:
    """Delete the records of ``job_ids`` (all when None); returns their job ids."""
    return _consume(job_ids, lambda record: record["job_id"])


def replay(job_ids: set[str] | None = None) -> list[tuple[str, str]]:
    """Submit the requests again as new jobs; returns (dead job id, new job id) pairs."""
    from tasks import infer

    return _consume(job_ids, lambda r: (r["job_id"], infer.delay(**r["request"]).id))
