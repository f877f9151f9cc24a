"""Fairness inside a tier: one agent's deep backlog does not hold back another's job."""

from __future__ import annotations

import time
import uuid

import pytest

from app.bench.harness import LocalFleet
from app.policy import fairness
from tasks import infer

CHAT = "llama3.2:3b"


def _fair(job: str, agent: str | None, priority: int = 5) -> int:
    return fairness.fair_priorities([fairness.Counted(job, "normal", agent, priority)])[0]


def test_an_agents_priority_drops_a_step_as_its_backlog_doubles() -> None:
    agent = f"hog-{uuid.uuid4().hex[:6]}"
    jobs = [f"j{i}" for i in range(9)]
    got = [_fair(j, agent) for j in jobs]
    assert got == [5, 4, 4, 3, 3, 3, 3, 2, 2]
    assert _fair("other", f"mouse-{agent}") == 5
    assert _fair("anon", None) == 5  # no agent: not adjusted
    for j in jobs:
        fairness.job_ended(j, "normal", agent)
    assert _fair("again", agent) == 5
    fairness.job_ended("again", "normal", agent)


def test_counting_many_jobs_at_once_gives_what_counting_them_one_by_one_gives() -> None:
    """A bulk call's jobs are counted in one round trip, in list order, several agents and
    tiers mixed: each gets the priority it would have had submitted alone, in that order."""
    hog, mouse = f"hog-{uuid.uuid4().hex[:6]}", f"mouse-{uuid.uuid4().hex[:6]}"
    jobs = [
        fairness.Counted(f"b{i}", tier, agent, priority)
        for i, (tier, agent, priority) in enumerate(
            [("normal", hog, 5)] * 3
            + [("normal", mouse, 5), ("batch", hog, 5), ("normal", None, 7)]
            + [("normal", hog, 9)] * 6
        )
    ]
    one_by_one_agent = f"alone-{uuid.uuid4().hex[:6]}"
    alone = [
        fairness.fair_priorities([fairness.Counted(f"a{i}", "normal", one_by_one_agent, p)])[0]
        for i, p in enumerate([5, 5, 5] + [9] * 6)
    ]
    got = fairness.fair_priorities(jobs)
    assert [got[i] for i in (0, 1, 2, *range(6, 12))] == alone == [5, 4, 4, 7, 7, 7, 7, 6, 6]
    assert got[3:6] == [5, 5, 7]  # another agent, another tier, no agent: counted apart
    for job in jobs:
        fairness.job_ended(job.job, job.tier, job.agent)
    for i in range(9):
        fairness.job_ended(f"a{i}", "normal", one_by_one_agent)


@pytest.mark.fleet
def test_a_single_job_is_not_stuck_behind_another_agents_backlog(
    healthy_fleet: LocalFleet,
) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=12.0)  # ~0.25 s a job: 120 take ~5 s on 6 slots
    hog = [infer.delay(model=CHAT, prompt=f"hog {i}", agent="hog", cache=False) for i in range(120)]
    time.sleep(0.3)
    mouse = infer.delay(model=CHAT, prompt="mouse", agent="mouse", cache=False).get(timeout=60)
    hog_results = [j.get(timeout=90) for j in hog]
    drained = max(r.routing.finished_at for r in hog_results) - min(
        r.routing.finished_at - r.routing.service_s - r.routing.wait_s for r in hog_results
    )
    # First in, first out would have it wait behind ~100 of hog's jobs (~4 s).
    assert mouse.routing.wait_s < 1.5, mouse.routing
    assert drained > 3 * mouse.routing.wait_s
