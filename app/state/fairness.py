"""Fairness counters: each agent's outstanding jobs per tier (``<ns>:agent_jobs:<tier>:<agent>``).

One sorted set per tier and agent, of job ids scored by submission time. Counting a job also
drops the entries older than the forgetting window and renews the set's expiry, so a job lost
without a trace stops counting. What the count does to a job's priority is the policy's
(:mod:`app.policy.fairness`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from app.state import keys


class FairnessCounters:
    """The outstanding jobs of each agent per tier, under one namespace."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis, self.ns = client, ns

    def count(self, jobs: Sequence[tuple[str, str, str]], forget_after_s: int) -> list[int]:
        """Count each ``(job, tier, agent)`` against its agent in its tier, in order; returns
        for each job its agent's outstanding jobs there once it was counted (itself included:
        as if counted one by one), forgetting those submitted over ``forget_after_s`` ago.
        One round trip for the lot (a bulk call's jobs)."""
        now = time.time()
        by_key: dict[str, list[str]] = {}
        for job, tier, agent in jobs:
            by_key.setdefault(keys.agent_jobs(self.ns, tier, agent), []).append(job)
        with self.redis.pipeline() as pipe:
            for key, members in by_key.items():
                pipe.zremrangebyscore(key, "-inf", now - forget_after_s)
                pipe.zadd(key, dict.fromkeys(members, now))
                pipe.zcard(key)
                pipe.expire(key, forget_after_s)
            replies = pipe.execute()
        # The k-th job of a key counts what was there before the lot, plus k + 1.
        before = {
            key: int(replies[4 * i + 2]) - len(members)
            for i, (key, members) in enumerate(by_key.items())
        }
        counts = []
        for _, tier, agent in jobs:
            key = keys.agent_jobs(self.ns, tier, agent)
            before[key] += 1
            counts.append(before[key])
        return counts

    def uncount(self, job: str, tier: str, agent: str) -> None:
        """The job ended: it counts no longer."""
        self.redis.zrem(keys.agent_jobs(self.ns, tier, agent), job)

    def outstanding(self, tier: str, agent: str) -> int:
        """The agent's jobs counted in ``tier`` now (forgotten ones included until the next
        count drops them)."""
        return int(self.redis.zcard(keys.agent_jobs(self.ns, tier, agent)))
