"""Fairness counters: each agent's outstanding jobs per tier (``<ns>:agent_jobs:<tier>:<agent>``).

One sorted set per tier and agent, of job ids scored by submission time. Counting a job also
drops the entries older than the forgetting window and renews the set's expiry, so a job lost
without a trace stops counting. What the count does to a job's priority is the policy's
(:mod:`app.policy.fairness`).
"""

from __future__ import annotations

import time

import redis

from app.state import keys


class FairnessCounters:
    """The outstanding jobs of each agent per tier, under one namespace."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis, self.ns = client, ns

    def count(self, job: str, tier: str, agent: str, forget_after_s: int) -> int:
        """Count ``job`` against its agent in ``tier``; returns the agent's outstanding jobs
        there, this one included, forgetting those submitted over ``forget_after_s`` ago (one
        round trip)."""
        key, now = keys.agent_jobs(self.ns, tier, agent), time.time()
        with self.redis.pipeline() as pipe:
            pipe.zremrangebyscore(key, "-inf", now - forget_after_s)
            pipe.zadd(key, {job: now})
            pipe.zcard(key)
            pipe.expire(key, forget_after_s)
            return int(pipe.execute()[2])

    def uncount(self, job: str, tier: str, agent: str) -> None:
        """The job ended: it counts no longer."""
        self.redis.zrem(keys.agent_jobs(self.ns, tier, agent), job)

    def outstanding(self, tier: str, agent: str) -> int:
        """The agent's jobs counted in ``tier`` now (forgotten ones included until the next
        count drops them)."""
        return int(self.redis.zcard(keys.agent_jobs(self.ns, tier, agent)))
