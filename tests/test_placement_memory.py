"""The placement plan fits models in each server's memory, not only in its model count.

Two simulated boxes of 10 GiB that may hold three models: a big model (7 GiB) fits alone, the
two small ones (4 GiB each) together, the big one beside a small one not. With ``memory_gb``
configured (the simulators' memory, ``instances_env``), the plan puts the big model on one box
and the small ones on the other, and nothing is evicted; counting models only, it put a small
model beside the big one and the server evicted one for the other's jobs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from app.bench.harness import free_port, instances_env, own_fleet, results_of
from app.state.fleet import fleet_state
from tasks import infer

pytestmark = pytest.mark.fleet

GIB = 1024**3
BIG, S1, S2 = "pm-big:latest", "pm-s1:latest", "pm-s2:latest"
SIZES = {BIG: 7 * GIB, S1: 4 * GIB, S2: 4 * GIB}
PARALLELISM = 2
JOBS = 12  # of each model


def _sims(tag: str) -> list[dict[str, Any]]:
    return [
        {
            "name": f"pm-{tag}-{box}",
            "port": free_port(),
            "num_parallel": PARALLELISM,
            "max_loaded_models": 3,
            "memory_bytes": 10 * GIB,
            "parallel_slowdown": 0.0,
            "models": [
                {
                    "name": model,
                    "kind": "chat",
                    "size_bytes": size,
                    "load_seconds": 0.5,
                    "tokens_per_second": 40.0,  # 0.25 s a job
                    "prompt_tokens_per_second": 0.0,
                    "default_num_predict": 10,
                }
                for model, size in SIZES.items()
            ],
        }
        for box in ("x", "y")
    ]


def _run(tmp_path: Path, tag: str, budget: bool) -> list[dict[str, Any]]:
    """Every model's jobs at once on a fresh fleet; each simulator's stats once they ended.
    Without ``budget`` Corral's configuration leaves ``memory_gb`` out (the simulators are
    still limited)."""
    sims = _sims(tag)
    configured = sims if budget else [{**s, "memory_bytes": None} for s in sims]
    workdir = tmp_path / tag
    workdir.mkdir()
    with own_fleet(
        workdir,
        sims,
        CORRAL_NAMESPACE=f"pm{tag}{os.getpid()}",
        CORRAL_INSTANCES=instances_env(configured),
        CORRAL_CACHE_ENABLED="false",
    ) as fleet:
        # Interleaved, as a mixed batch comes in.
        models = [m for _ in range(JOBS) for m in (BIG, S1, S2)]
        jobs = [
            infer.delay(model=m, prompt=f"{tag} {i}", tier="batch") for i, m in enumerate(models)
        ]
        results = results_of(jobs, timeout=40)
        assert [r.model for r in results] == models
        # What the plan read: the budget as configured, every size as the servers reported.
        for box in fleet_state().instances.snapshot().instances:
            assert box.memory == (10 * GIB if budget else None), box
            assert box.sizes == SIZES, box
        return [fleet.sim_stats(name) for name in fleet.sim_urls]


def test_a_big_model_and_two_small_ones_share_two_boxes_by_memory(tmp_path: Path) -> None:
    stats = _run(tmp_path, "mem", budget=True)
    for s in stats:
        assert s["peak_in_flight"] <= PARALLELISM, s
        assert s["errors_total"] == 0 and s["rejected_total"] == 0, s
    evictions = sum(s["evictions_total"] for s in stats)
    # The plan's own unloads (keep_alive 0) are not evictions: the server evicts only when a
    # model is asked for where it does not fit.
    assert evictions <= 1, [(s["evictions_total"], s["models"]) for s in stats]
    # The big model on one box, the small ones on the other (and on the big one's box once
    # its jobs ended, or a switch the plan made and undid): 3 to 5 loads in seven runs.
    assert sum(s["loads_total"] for s in stats) <= 7, [s["models"] for s in stats]

    # The same fleet, Corral counting models only: the simulators evict for memory (18 and
    # 27 evictions in two runs, against none with the budget).
    blind = _run(tmp_path, "count", budget=False)
    assert sum(s["evictions_total"] for s in blind) >= evictions + 5, [
        (s["evictions_total"], s["models"]) for s in blind
    ]
