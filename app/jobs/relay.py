"""Tokens of a streaming job, relayed from the instance worker to whoever streams them on.

The worker appends each Ollama chunk to a Redis stream per job as it arrives; a reader (the
gateway) follows the stream and gets the first token long before the job ends. Each entry
carries the attempt number, so a reader can tell a retried attempt's output from the first,
and the id of the execution that wrote it: a job redelivered after its worker died reruns
under the same attempt number, and only the run id tells its output from the dead run's.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio

from app.settings import get_settings
from app.state import keys
from app.state.client import redis_client

#: A relay outlives its job by this long, for slow readers.
TTL_SECONDS = 3600


@dataclass(frozen=True)
class RelayEntry:
    id: str
    attempt: int
    chunk: dict[str, Any]
    #: The execution that wrote the entry (one per ``sink``); "" for entries written without.
    run: str = ""


def _relay_key(ns: str, job: str) -> str:
    return keys.relay(ns, job)


#: XREAD's reply on the decoding RESP2 client: one ``[stream, [(entry id, fields), ...]]`` per
#: stream (redis-py types it as the union of its RESP2 and RESP3 shapes).
XReadReply = list[list[Any]]


def _entries(got: XReadReply) -> list[RelayEntry]:
    return [
        RelayEntry(entry_id, int(fields["a"]), json.loads(fields["c"]), fields.get("r", ""))
        for _, entries in got
        for entry_id, fields in entries
    ]


@dataclass
class TokenRelay:
    redis: redis.Redis
    ns: str

    def sink(self, job: str, attempt: int) -> Callable[[dict[str, Any]], None]:
        """A callback that appends one chunk of ``attempt`` to the job's stream."""
        key = _relay_key(self.ns, job)
        run = secrets.token_hex(4)

        def append(chunk: dict[str, Any]) -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"a": attempt, "r": run, "c": json.dumps(chunk)})
                pipe.expire(key, TTL_SECONDS)
                pipe.execute()

        return append

    def read(self, job: str, after: str = "0", block_ms: int = 1000) -> list[RelayEntry]:
        """Entries after ``after`` (an entry id), waiting up to ``block_ms`` for the first."""
        got = self.redis.xread({_relay_key(self.ns, job): after}, block=block_ms, count=256)
        return _entries(cast(XReadReply, got))


@dataclass
class AsyncTokenRelay:
    """The reader side for asyncio code (the gateway): waiting never blocks the event loop."""

    redis: redis.asyncio.Redis
    ns: str

    async def read(
        self, job: str, after: str = "0", block_ms: int | None = 1000
    ) -> list[RelayEntry]:
        """Entries after ``after``; waits up to ``block_ms`` for the first (None: no wait)."""
        key = _relay_key(self.ns, job)
        got = await self.redis.xread({key: after}, block=block_ms, count=256)
        return _entries(cast(XReadReply, got))


def token_relay() -> TokenRelay:
    s = get_settings()
    return TokenRelay(redis_client(s.redis_url), s.namespace)
