"""Degradation levels: the pure rules, then the levels in force on the real fleet."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from app.bench.harness import LocalFleet, wait_until
from app.errors import Overloaded
from app.policy.degradation import READ_TTL, Signals, degradation, next_level, target_level
from app.settings import get_settings
from app.state.fleet import fleet_state
from tasks import infer

CHAT = "llama3.2:3b"


def test_levels_follow_the_backlog_and_the_interactive_wait() -> None:
    calm = Signals(urgent_per_slot=1, interactive_wait_s=2)
    assert target_level(calm)[0] == 0  # a deep batch backlog alone is normal work
    assert target_level(Signals(12, 0))[0] == 1
    assert target_level(Signals(45, 0))[0] == 2
    assert target_level(Signals(600, 0))[0] == 3
    level, reason = target_level(Signals(0, 70))
    assert level == 2 and "interactive jobs wait" in reason


def test_levels_rise_at_once_and_fall_one_step_after_the_hold() -> None:
    hold = get_settings().degradation_hold
    assert next_level(0, None, 3, now=100.0) == 3
    assert next_level(3, 100.0, 0, now=100.0 + hold / 2) == 3
    assert next_level(3, 100.0, 0, now=100.0 + hold) == 2


@pytest.fixture
def pinned(healthy_fleet: LocalFleet) -> Iterator[LocalFleet]:
    yield healthy_fleet
    degradation().pin(None)


@pytest.mark.fleet
def test_a_yielding_tier_still_takes_every_slot_nobody_more_urgent_wants(
    pinned: LocalFleet,
) -> None:
    """Level 2 reorders: interactive jobs go first, but normal and batch jobs are never held
    while a slot is free for them (the fleet stays work-conserving at every level)."""
    degradation().pin(2)
    time.sleep(READ_TTL + 0.2)  # every process rereads the level within READ_TTL
    t0 = time.time()
    batch = [infer.delay(model=CHAT, prompt=f"b {i}", tier="batch", cache=False) for i in range(6)]
    normal = [infer.delay(model=CHAT, prompt=f"n {i}", cache=False) for i in range(6)]
    assert infer.delay(model=CHAT, prompt="now", tier="interactive").get(timeout=30).text
    # 12 jobs on 6 free slots: all run at once, none waits for the level to fall.
    results = [j.get(timeout=30) for j in batch + normal]
    assert max(r.routing.finished_at for r in results) - t0 < 10
    assert degradation().level(fresh=True) == 2


@pytest.mark.fleet
def test_the_top_level_refuses_new_normal_jobs_at_the_call(pinned: LocalFleet) -> None:
    degradation().pin(3)
    time.sleep(READ_TTL + 0.2)
    with pytest.raises(Overloaded, match="retry after"):
        infer.delay(model=CHAT, prompt="no", tier="normal")
    assert infer.delay(model=CHAT, prompt="yes", tier="interactive").get(timeout=30).text
    # Batch work is meant to wait: it is still taken, and it still runs on a free slot.
    assert infer.delay(model=CHAT, prompt="later", tier="batch").get(timeout=30).text


@pytest.mark.fleet
def test_a_burst_raises_the_level_and_it_falls_back_on_its_own(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=30.0)  # ~0.6 s a job: 10 jobs a second
    state = degradation()
    # The signal divides the backlog by every slot of the fleet, also those of an instance
    # that does not serve this model (the real backend's, when it runs): a burst of 5 jobs a
    # slot over the first level's threshold stays above it for seconds, whatever the fleet
    # (90 jobs on the simulators' 6 slots; with only 90 on 8 slots it was above for 0.4 s).
    snap = fleet_state().instances.snapshot()
    slots = sum(i.capacity for i in snap.instances if i.up(snap.now))
    jobs = int((get_settings().degradation_backlog_per_slot[0] + 5) * slots)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            seen.append(state.level(fresh=True))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        burst = [infer.delay(model=CHAT, prompt=f"b {i}", cache=False) for i in range(jobs)]
        assert all(j.get(timeout=120).text for j in burst)
    finally:
        done.set()
        watcher.join(5)
        for name in healthy_fleet.sim_urls:
            healthy_fleet.faults(name, slow_factor=1.0)
    assert max(seen) >= 1, "the level never rose during the burst"
    wait_until(lambda: state.level(fresh=True) == 0, 20, "the level to fall back to normal")
