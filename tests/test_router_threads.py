"""A model's backlog does not hold the router threads another model's free slots need.

A router thread holds its job until a slot is free for it. Two models on boxes of their own:
``a``'s backlog waits for its one busy box, ``b``'s box is idle. With every router thread
taken by ``a``'s waiting jobs, ``b``'s jobs waited behind them, one thread freed per job of
``a`` that ended (``app.jobs.router_worker.PrefetchPerModel``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.bench.harness import free_port, own_fleet, wait_until
from tasks import infer

pytestmark = pytest.mark.fleet

A, B = "rt-a:latest", "rt-b:latest"


def _box(name: str, model: str, tokens_per_second: float) -> dict[str, object]:
    return {
        "name": name,
        "port": free_port(),
        "num_parallel": 2,
        "preloaded": [model],
        "models": [
            {
                "name": model,
                "kind": "chat",
                "tokens_per_second": tokens_per_second,
                "default_num_predict": 10,
            }
        ],
    }


def test_a_backlog_of_one_model_does_not_hold_back_another_model_s_idle_box(
    tmp_path: Path,
) -> None:
    # a: 1 s a job on 2 slots; b: 0.1 s a job on 2 slots of its own.
    sims = [_box("rt-box-a", A, 10.0), _box("rt-box-b", B, 100.0)]
    with own_fleet(
        tmp_path,
        sims,
        CORRAL_NAMESPACE=f"rt{os.getpid()}",
        CORRAL_CACHE_ENABLED="false",
        # The batch router consumes 3 queues (a's, b's and scheduled batches): 3 x 2 <= 8.
        CORRAL_ROUTER_CONCURRENCY="8",
        CORRAL_ROUTER_PREFETCH_PER_MODEL="2",
    ) as fleet:
        for model in (A, B):
            infer.delay(model=model, prompt="warm", tier="batch").get(timeout=60)
        backlog = [infer.delay(model=A, prompt=f"a {i}", tier="batch") for i in range(20)]
        # a's jobs fill the router's threads beyond its prefetch (were it uncapped).
        wait_until(lambda: fleet.sim_stats("rt-box-a")["requests_total"] >= 3, 30, "a's jobs")
        submitted = time.time()
        b_jobs = [infer.delay(model=B, prompt=f"b {i}", tier="batch") for i in range(10)]
        b_done = max(j.get(timeout=60).routing.finished_at for j in b_jobs)
        # a's jobs not ended by now end after b's: the rest of the backlog is not waited for
        # (purged with the fleet).
        a_ends = [j.get(timeout=5).routing.finished_at for j in backlog if j.ready()]
        # b's 10 jobs take 0.5 s on their box; a's box ends 2 jobs a second. Behind a's
        # waiting jobs, b got a thread only as a's ended: 12 of a's jobs (measured).
        a_meanwhile = sum(submitted < t < b_done for t in a_ends)
        assert a_meanwhile < 4, (a_meanwhile, round(b_done - submitted, 2))
        for name in fleet.sim_urls:
            assert fleet.sim_stats(name)["peak_in_flight"] <= 2, name
