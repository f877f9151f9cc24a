"""An instance's own rate limit (``rate_limit_per_minute``): a token bucket in its hash.

The bucket (``rate_tokens``, ``rate_at``) is taken by every grant on the instance, in the same
atomic step as the slot: ``lua/instance_rate.lua``, included into the slot scripts, takes it
with the shared bucket arithmetic of ``lua/bucket.lua`` (:mod:`app.state.buckets`). With no
token the instance counts as full, and a freed slot waits for the rate like a new one. The
rate itself is written by the registry (:mod:`app.state.instances`).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from app.state import keys
from app.state.buckets import BURST_SECONDS


@dataclass(frozen=True)
class InstanceRate:
    redis: redis.Redis
    ns: str

    #: Seconds of burst of an instance's bucket (the same as the agents' buckets).
    burst_seconds: float = BURST_SECONDS

    def per_minute(self, instance: str) -> float:
        """The instance's rate limit; 0: none."""
        return float(self.redis.hget(keys.instance(self.ns, instance), "rate_per_minute") or 0)
