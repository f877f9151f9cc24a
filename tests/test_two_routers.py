"""Two routers per tier at once: the slot scripts are the only arbiter, so no slot is granted
twice and no job runs twice, however the two processes interleave."""

from __future__ import annotations

import psutil
import pytest

from app.bench.harness import LocalFleet, queue_counts, wait_until
from app.queues import route_queue
from app.settings import TIERS
from tasks import infer

CHAT = "llama3.2:3b"


@pytest.mark.fleet
def test_two_routers_per_tier_never_grant_one_slot_twice(healthy_fleet: LocalFleet) -> None:
    extra = [f"router-{tier}-2" for tier in TIERS]
    for tier, name in zip(TIERS, extra, strict=True):
        healthy_fleet.start_router(tier, name=name)
    try:
        for tier in TIERS:
            wait_until(
                lambda tier=tier: queue_counts(route_queue(CHAT, tier))[1] == 2,
                60,
                f"a second {tier} router",
            )
        for name in healthy_fleet.sim_urls:
            healthy_fleet.faults(name, slow_factor=5.0)  # ~0.1 s a job: routers keep waiting
        routers = {
            n: psutil.Process(c.proc.pid)
            for n, c in healthy_fleet.procs.items()
            if n.startswith("router-") and c.proc is not None
        }
        cpu_before = {n: sum(p.cpu_times()[:2]) for n, p in routers.items()}
        jobs = [
            infer.delay(model=CHAT, prompt=f"two {i}", tier=TIERS[i % 3], cache=False)
            for i in range(240)
        ]
        results = [j.get(timeout=120) for j in jobs]
        assert len({r.id for r in results}) == len(jobs)
        stats = {n: healthy_fleet.sim_stats(n) for n in healthy_fleet.sim_urls}
        # Every job reached a server exactly once: none was granted, and run, twice.
        assert sum(s["requests_total"] for s in stats.values()) == len(jobs)
        assert max(s["peak_in_flight"] for s in stats.values()) <= 2
        # Both routers of each tier took part: routing its ~40 jobs costs a router ~0.25 s of
        # CPU here, an idle one a few hundredths.
        used = {n: sum(p.cpu_times()[:2]) - cpu_before[n] for n, p in routers.items()}
        assert all(used[n] > 0.1 for n in used), used
    finally:
        for name in healthy_fleet.sim_urls:
            healthy_fleet.faults(name, slow_factor=1.0)
        for name in extra:
            child = healthy_fleet.procs.pop(name, None)
            if child is not None:
                child.stop()
