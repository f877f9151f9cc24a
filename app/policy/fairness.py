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
from collections.abc import Sequence
from dataclasses import dataclass

from app.settings import Tier
from app.state.fleet import fleet_state

#: Seconds after which an entry counts no longer (the longest a job should take).
FORGET_AFTER_S = 6 * 3600


@dataclass(frozen=True)
class Counted:
    """A job about to be published, as fairness sees it."""

    job: str
    tier: Tier
    agent: str | None
    #: The priority it would be queued with inside its tier, before fairness.
    priority: int


def fair_priorities(jobs: Sequence[Counted]) -> list[int]:
    """Count the jobs against their agents, in order, and return the priority each is queued
    with (one Redis round trip for the lot: a bulk call's jobs)."""
    counted = [(j.job, j.tier, j.agent) for j in jobs if j.agent]
    counts = fleet_state().fairness.count(counted, FORGET_AFTER_S)
    outstanding = dict(zip((job for job, _, _ in counted), counts, strict=True))
    return [
        max(0, j.priority - int(math.log2(max(outstanding[j.job], 1))))
        if j.job in outstanding
        else j.priority
        for j in jobs
    ]


def job_ended(job: str, tier: str | None, agent: str | None) -> None:
    """The job ended (done, failed or revoked): it counts against its agent no longer."""
    if agent and tier:
        fleet_state().fairness.uncount(job, tier, agent)
