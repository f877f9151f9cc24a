"""Redis clients from Corral's URLs: one place that knows a plain Redis from a Sentinel group.

A URL is either one server (``redis://``, ``rediss://``, ``unix://``) or a Sentinel group,
written as Celery writes it for its result backend: every Sentinel, ``;``-separated, the
database and password on the first (``sentinel://:pw@10.0.0.1:26379/1;sentinel://10.0.0.2:26379``).
The group's service name is the ``redis_sentinel_master`` setting. A client of a Sentinel group
is redis-py's own (``Sentinel.master_for``): it asks the Sentinels where the primary is, and
asks again when a connection fails or lands on a replica, so a failover needs nothing from
Corral but the retries it already makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

from app.settings import get_settings

SENTINEL_SCHEME = "sentinel://"

#: How long to wait for a Sentinel's answer, and to connect to the primary it names.
SOCKET_TIMEOUT_S = 5.0

#: A command that cannot reach Redis is tried again for about 12 s (0.05 s doubling up to 1 s
#: a try, 15 tries): long enough for Sentinel to notice a dead primary and promote a replica
#: (its down-after-milliseconds plus an election, a few seconds), and for a restarted server.
#: Each try asks the Sentinels again where the primary is.
RETRIES = 15
_BACKOFF = ExponentialBackoff(cap=1.0, base=0.05)
_RETRY_ON = [ConnectionError, TimeoutError]


@dataclass(frozen=True)
class SentinelGroup:
    """Where the Sentinels of one group are, and what to ask the primary for."""

    hosts: tuple[tuple[str, int], ...]
    db: int
    password: str | None
    service: str

    @classmethod
    def from_url(cls, url: str, service: str) -> SentinelGroup:
        parts = [urlsplit(chunk) for chunk in url.split(";") if chunk.strip()]
        if not parts or any(p.scheme != "sentinel" or not p.hostname for p in parts):
            raise ValueError(
                f"not a Sentinel URL: {url!r}; write every Sentinel as"
                " sentinel://[:password@]host:port[/db], separated by ';'"
            )
        first = parts[0]
        return cls(
            hosts=tuple((p.hostname or "", p.port or 26379) for p in parts),
            db=int(first.path.strip("/") or 0),
            password=first.password,
            service=service,
        )


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def sentinel_group(url: str) -> SentinelGroup:
    return SentinelGroup.from_url(url, get_settings().redis_sentinel_master)


def _client_options(group: SentinelGroup) -> dict[str, Any]:
    # A bound on connecting only: reads may rightly wait long (BLPOP, XREAD, pub/sub).
    return {"db": group.db, "password": group.password, "socket_connect_timeout": SOCKET_TIMEOUT_S}


def _retry() -> dict[str, Any]:
    return {"retry": Retry(_BACKOFF, RETRIES), "retry_on_error": _RETRY_ON}


def _async_retry() -> dict[str, Any]:
    return {"retry": redis.asyncio.retry.Retry(_BACKOFF, RETRIES), "retry_on_error": _RETRY_ON}


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process."""
    if not is_sentinel(url):
        return redis.Redis.from_url(
            url, decode_responses=True, health_check_interval=30, **_retry()
        )
    group = sentinel_group(url)
    sentinels = redis.sentinel.Sentinel(
        list(group.hosts), sentinel_kwargs={"socket_timeout": SOCKET_TIMEOUT_S}
    )
    client: redis.Redis = sentinels.master_for(
        group.service,
        decode_responses=True,
        health_check_interval=30,
        **_client_options(group),
        **_retry(),
    )
    return client


class _BlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """The primary of a Sentinel group, with a bounded pool that makes callers wait."""


def async_client(
    url: str, max_connections: int, wait_s: float, **options: Any
) -> redis.asyncio.Redis:
    """An asyncio client whose callers wait up to ``wait_s`` for one of ``max_connections``
    (redis-py's default pool raises instead once all are in use)."""
    if not is_sentinel(url):
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=wait_s, **_async_retry(), **options
        )
        return redis.asyncio.Redis(connection_pool=pool)
    group = sentinel_group(url)
    sentinels = redis.asyncio.sentinel.Sentinel(
        list(group.hosts), sentinel_kwargs={"socket_timeout": SOCKET_TIMEOUT_S}
    )
    primary: redis.asyncio.Redis = sentinels.master_for(
        group.service,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=wait_s,
        **_client_options(group),
        **_async_retry(),
        **options,
    )
    return primary
