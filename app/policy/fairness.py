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
without a trace cannot lower its agent's priority forever. The sets are the state layer's
(``fleet_state().fairness``, :mod:`app.state.fairness`); this module holds the rule.
"""

from __future__ import annotations

import math

from app.settings import Tier
from app.state.fleet import fleet_state

#: Seconds after which an entry counts no longer (the longest a job should take).
FORGET_AFTER_S = 6 * 3600


def fair_priority(job: str, tier: Tier, agent: str | None, priority: int) -> int:
    """Count the job against its agent and return the priority it is queued with."""
    if not agent:
        return priority
    outstanding = fleet_state().fairness.count(job, tier, agent, FORGET_AFTER_S)
    return max(0, priority - int(math.log2(max(outstanding, 1))))


def job_ended(job: str, tier: str | None, agent: str | None) -> None:
    """The job ended (done, failed or revoked): it counts against its agent no longer."""
    if agent and tier:
        fleet_state().fairness.uncount(job, tier, agent)
