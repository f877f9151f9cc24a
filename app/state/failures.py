"""The fleet's most recent failed attempts: a short capped list in Redis, newest first.

The dead-letter queue keeps the full record of every job that gave up, but reading it means
fetching messages from RabbitMQ and letting them return; the dashboard polls every second,
so it reads this list instead. It also shows the attempts that failed and were retried,
which never reach the dead-letter queue. Recording never fails a job: with Redis
unreachable the entry is dropped and a warning logged.
"""

from __future__ import annotations

import json
import logging

import redis
from pydantic import BaseModel

from app.settings import get_settings
from app.state import keys
from app.state.client import redis_client

log = logging.getLogger(__name__)

#: Entries kept; older ones are trimmed as new ones arrive.
KEEP = 50
#: Characters of an error message kept (Ollama's errors can quote whole bodies).
MESSAGE_CHARS = 300


class Failure(BaseModel):
    at: float
    job_id: str
    model: str
    tier: str
    instance: str
    error: str
    message: str
    attempt: int
    #: True when the job gave up with this attempt (dead-lettered), False when it was retried.
    gave_up: bool


def _key() -> str:
    return keys.failures(get_settings().namespace)


def record(failure: Failure) -> None:
    entry = failure.model_copy(update={"message": failure.message[:MESSAGE_CHARS]})
    client = redis_client(get_settings().redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.lpush(_key(), entry.model_dump_json())
            pipe.ltrim(_key(), 0, KEEP - 1)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("failure of job %s not recorded: %s", failure.job_id, exc)


def recent(limit: int = KEEP) -> list[Failure]:
    """The last ``limit`` failed attempts, newest first."""
    rows = redis_client(get_settings().redis_url).lrange(_key(), 0, limit - 1)
    return [Failure.model_validate(json.loads(row)) for row in rows]
