"""``corral bench --scenario short``: short jobs on mixed fleets, where the per-job gap counts.

Two fleets of simulated instances whose service times are fixed (no random lengths, no
prompt time, no slowdown when both slots run), each given its whole batch at once:

* 2 fast boxes (0.25 s a job) and 2 four times slower (1.0 s), parallelism 2, 160 jobs;
* three speeds (0.2 s, 0.5 s, 1.0 s a job), one box each, parallelism 4, 300 jobs.

Each batch runs ``RUNS`` times through Corral with the default strategy and with ``smart``,
and through a least-connections proxy; the report gives each run and the median. Ideal =
total work / total capacity. For the Corral runs, the slot gap (a job's end to the next
start on its slot, from the simulators' own records) is reported too.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import typer

from app.bench.burst import fleet_spans, slot_gaps
from app.bench.fleet import MIX, Proxy, _model, _stack, corral_batch
from app.bench.harness import LocalFleet, free_port

RUNS = 3
#: name, base service time (s), boxes as (name, seconds a job), parallelism, jobs.
FLEETS: list[tuple[str, float, list[tuple[str, float]], int, int]] = [
    ("2 fast + 2 slow", 0.25, [("f1", 0.25), ("f2", 0.25), ("s1", 1.0), ("s2", 1.0)], 2, 160),
    ("three speeds", 0.2, [("v02", 0.2), ("v05", 0.5), ("v10", 1.0)], 4, 300),
]


def _sims(base_s: float, boxes: list[tuple[str, float]], parallelism: int) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "port": free_port(),
            "num_parallel": parallelism,
            "speed": base_s / seconds,
            "parallel_slowdown": 0.0,
            "preloaded": [MIX],
            "models": [_model(10 / base_s)],
        }
        for name, seconds in boxes
    ]


def _ideal(boxes: list[tuple[str, float]], parallelism: int, jobs: int) -> float:
    return jobs / sum(parallelism / seconds for _, seconds in boxes)


def run_short(runs: int = RUNS) -> dict[str, Any]:
    from app.settings import get_settings
    from app.state.fleet import fleet_state

    default = get_settings().strategy
    out: dict[str, Any] = {"runs_each": runs, "fleets": {}}
    for label, base_s, boxes, parallelism, jobs in FLEETS:
        ideal = _ideal(boxes, parallelism, jobs)
        sims = _sims(base_s, boxes, parallelism)
        entry: dict[str, Any] = {"jobs": jobs, "ideal_s": round(ideal, 3), "results": {}}
        typer.echo(f"  {label}: {jobs} jobs, ideal {ideal:.2f} s")
        with _stack(sims, "short") as fleet:
            urls = fleet.sim_urls
            proxy = Proxy(list(urls.values()), "least_connections")
            by_url = {u: n for n, u in urls.items()}
            for strategy in dict.fromkeys([default, "smart"]):
                fleet_state().instances.set_strategy(strategy)
                rows = [_corral_run(fleet, strategy, jobs, ideal) for _ in range(runs)]
                entry["results"][f"corral {strategy}"] = _summary(rows)
            rows = []
            for _ in range(runs):
                fleet.reset_sims()
                t0 = time.time()
                with ThreadPoolExecutor(64) as pool:
                    hits = list(pool.map(proxy.call, (f"proxy {i}" for i in range(jobs))))
                elapsed = time.time() - t0
                served = Counter(by_url[h.url] for h in hits)
                rows.append(
                    {
                        "makespan_s": round(elapsed, 3),
                        "vs_ideal": round(elapsed / ideal, 3),
                        "jobs_per_instance": dict(sorted(served.items())),
                    }
                )
            entry["results"]["proxy least_connections"] = _summary(rows)
        for name, r in entry["results"].items():
            gap = (
                f", slot gap p50 {r['slot_gap_p50_ms']:.1f} ms p95 {r['slot_gap_p95_ms']:.1f} ms"
                if "slot_gap_p50_ms" in r
                else ""
            )
            typer.echo(
                f"    {name:24} median {r['vs_ideal']:.3f} x ideal"
                f" (runs {', '.join(f'{x:.3f}' for x in r['each'])}){gap}"
            )
        out["fleets"][label] = entry
    return out


def _corral_run(fleet: LocalFleet, strategy: str, jobs: int, ideal: float) -> dict[str, Any]:
    fleet.reset_sims()
    t0 = time.time()
    served = corral_batch(strategy, jobs)
    elapsed = time.time() - t0
    spans, slots = fleet_spans(fleet.sim_urls)
    return {
        "makespan_s": round(elapsed, 3),
        "vs_ideal": round(elapsed / ideal, 3),
        "jobs_per_instance": dict(sorted(served.items())),
        "peak_in_flight": {n: fleet.sim_stats(n)["peak_in_flight"] for n in fleet.sim_urls},
        **slot_gaps(spans, slots, t0),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run's figures, and every run's ratio to the ideal."""
    ratios = [r["vs_ideal"] for r in rows]
    median = sorted(rows, key=lambda r: r["vs_ideal"])[len(rows) // 2]
    summary = {**median, "each": ratios, "median_of_runs": statistics.median(ratios)}
    for key in ("slot_gap_p50_ms", "slot_gap_p95_ms"):
        if key in median:
            summary[key] = statistics.median(r[key] for r in rows)
    return summary
