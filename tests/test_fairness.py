"""Fairness inside a tier: one agent's deep backlog does not hold back another's job."""

from __future__ import annotations

import time
import uuid

import pytest

from app.bench.harness import LocalFleet
from app.policy import fairness
from tasks import infer

CHAT = "llama3.2:3b"


def test_an_agents_priority_drops_a_step_as_its_backlog_doubles() -> None:
    agent = f"hog-{uuid.uuid4().hex[:6]}"
    jobs = [f"j{i}" for i in range(9)]
    got = [fairness.fair_priority(j, "normal", agent, 5) for j in jobs]
    assert got == [5, 4, 4, 3, 3, 3, 3, 2, 2]
    assert fairness.fair_priority("other", "normal", f"mouse-{agent}", 5) == 5
    assert fairness.fair_priority("anon", "normal", None, 5) == 5  # no agent: not adjusted
    for j in jobs:
        fairness.job_ended(j, "normal", agent)
    assert fairness.fair_priority("again", "normal", agent, 5) == 5
    fairness.job_ended("again", "normal", agent)


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
