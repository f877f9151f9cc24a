"""The Redis client of the state layer: one per URL per process (and so one pool)."""

from __future__ import annotations

from functools import lru_cache

import redis


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
