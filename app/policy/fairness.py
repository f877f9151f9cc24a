"""Fairness between agents of one tier: a deep backlog of one agent yields to the others.

Jobs wait in RabbitMQ, and RabbitMQ serves a queue by priority, then first in first out: an
agent that queues 500 jobs would have another agent's single job wait behind all of them. So
a job's priority inside its tier is lowered by how many jobs its agent already has waiting or
running in that tier: by one step for the second, two for the fourth, three for the eighth
(``floor(log2(n))``), down to 0. So a light agent's job goes ahead of a heavy agent's
backlog, in the broker and among the jobs waiting for a slot, while the heavy agent's jobs
still run whenever no lighter one is waiting. Jobs with no ``agent`` are not adjusted.

The count is a sorted set of job ids per tier and agent, with their submission time: a job
leaves it when it ends, and entries older than ``FORGET_AFTER_S`` are dropped, so a job lost
without a trace cannot lower its agent's priority forever.
"""

from __future__ import annotations

import math
import time

from app.settings import Tier, get_settings
from app.state import keys
from app.state.client import redis_client

#: Seconds after which an entry counts no longer (the longest a job should take).
FORGET_AFTER_S = 6 * 3600


def _key(tier: str, agent: str) -> str:
    return keys.agent_jobs(get_settings().namespace, tier, agent)


def fair_priority(job: str, tier: Tier, agent: str | None, priority: int) -> int:
    """Count the job against its agent and return the priority it is queued with."""
    if not agent:
        return priority
    key, now = _key(tier, agent), time.time()
    with redis_client(get_settings().redis_url).pipeline() as pipe:
        pipe.zremrangebyscore(key, "-inf", now - FORGET_AFTER_S)
        pipe.zadd(key, {job: now})
        pipe.zcard(key)
        pipe.expire(key, FORGET_AFTER_S)
        outstanding = pipe.execute()[2]
    return max(0, priority - int(math.log2(max(outstanding, 1))))


def job_ended(job: str, tier: str | None, agent: str | None) -> None:
    if agent and tier:
        redis_client(get_settings().redis_url).zrem(_key(tier, agent), job)
