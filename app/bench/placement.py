"""``corral bench --scenario placement``: more models than the boxes can hold at once.

Issue 16's yardstick, measured before any placement logic exists (the baseline). Every run
starts with nothing loaded anywhere; jobs are submitted at once, in a shuffled (seeded) order
of models. Each scenario runs through Corral with its default strategy, through Corral with
``smart``, and through a least-connections proxy, side by side on the same simulators:

1. ``two_models``: 3 boxes of parallelism 2 that hold ONE model at a time
   (``max_loaded_models=1``), two chat models in equal share, 120 jobs of 0.25 s, 1 s loads.
   Ideal = total work / slots + one load.
2. ``five_models``: 4 boxes of parallelism 2 that hold two models at a time, 5 models with
   demand 50/20/15/10/5 %, 400 jobs. Ideal as above; every model's jobs must complete.
3. ``cold_interactive`` (during scenario 2's backlog, in the same run): 10 interactive jobs
   for a sixth model loaded nowhere, one every 0.5 s from 2 s after the backlog was submitted.
   Their wait (time to the answer minus their own generation) against the target
   load + 2 x service.

Each Corral strategy runs ``RUNS`` times (the report gives the median run by makespan, and
every run's figures); the proxy, far off and the slowest part of the bench, runs once. Loads,
evictions and the peak of requests inside each server (``peak_in_flight``, and
``peak_active``: those holding a slot, against the parallelism) are the simulators' own
counters (``/sim/stats``); the unloads and preloads the instance workers sent to follow the
plan (``app.jobs.model_swap``) are Corral's counters; each run keeps the simulators' timeline
(``/sim/events``: every load, unload and slot held, with its model, in seconds from the
submission), to see where the time above the ideal goes. The simulator keeps
one slot queue per loaded model, with no compute shared between them: a box holding two
models can run 2 x parallelism requests at once, which the proxy (no cap) may use and Corral
(capacity = parallelism per box) does not. The ideal counts parallelism per box.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import typer

from app.bench.fleet import Proxy, _latency, _stack
from app.bench.harness import LocalFleet, free_port, wait_until
from app.settings import get_settings

SERVICE_S = 0.25
LOAD_S = 1.0
PARALLELISM = 2
TOKENS = 10  # default_num_predict: TOKENS / SERVICE_S tokens per second
SEED = 16
STRATEGIES = ("least_connections", "smart")  # Corral's default first
RUNS = 3  # per Corral strategy; the proxy runs once

TWO_MODELS = {"pl-a:latest": 60, "pl-b:latest": 60}
FIVE_MODELS = {
    "pl-1:latest": 200,
    "pl-2:latest": 80,
    "pl-3:latest": 60,
    "pl-4:latest": 40,
    "pl-5:latest": 20,
}
COLD = "pl-cold:latest"
COLD_JOBS, COLD_FIRST_S, COLD_EVERY_S = 10, 2.0, 0.5


def _model(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "chat",
        "tokens_per_second": TOKENS / SERVICE_S,
        "prompt_tokens_per_second": 0.0,
        "default_num_predict": TOKENS,
        "load_seconds": LOAD_S,
    }


def placement_fleet(
    tag: str, boxes: int, max_loaded: int, models: list[str]
) -> list[dict[str, Any]]:
    """``boxes`` simulators of parallelism 2 holding ``max_loaded`` models at a time, none
    loaded at start; every box serves every model."""
    return [
        {
            "name": f"{tag}-{i + 1}",
            "port": free_port(),
            "num_parallel": PARALLELISM,
            "max_loaded_models": max_loaded,
            "parallel_slowdown": 0.0,
            "preloaded": [],
            "models": [_model(m) for m in models],
        }
        for i in range(boxes)
    ]


def ideal_s(jobs: int, boxes: int) -> float:
    """Total work / slots, plus one load."""
    return jobs * SERVICE_S / (boxes * PARALLELISM) + LOAD_S


def shuffled(demand: dict[str, int]) -> list[str]:
    """One model name per job, in a seeded random order."""
    order = [m for m, n in demand.items() for _ in range(n)]
    random.Random(SEED).shuffle(order)
    return order


def _unload_all(fleet: LocalFleet) -> None:
    """Nothing loaded anywhere, counters zeroed, and Corral's view of /api/ps refreshed."""
    from app.state.fleet import fleet_state

    # The last plan would have the workers preload its models again (app.jobs.model_swap):
    # forget it, and let a preload a worker started from it end before unloading.
    fleet_state().placement.clear()
    time.sleep(get_settings().heartbeat_interval + LOAD_S + 0.5)
    for url in fleet.sim_urls.values():
        for m in requests.get(f"{url}/api/ps", timeout=10).json()["models"]:
            body = {"model": m["model"], "keep_alive": 0}
            requests.post(f"{url}/api/generate", json=body, timeout=30).raise_for_status()
    wait_until(
        lambda: all(
            not requests.get(f"{u}/api/ps", timeout=10).json()["models"]
            for u in fleet.sim_urls.values()
        ),
        30,
        "every model unloaded",
    )
    fleet.reset_sims()
    time.sleep(2 * get_settings().heartbeat_interval + 0.5)  # the workers' heartbeats saw it


def _counters(fleet: LocalFleet) -> dict[str, Any]:
    stats = {n: fleet.sim_stats(n) for n in fleet.sim_urls}
    per_model: Counter[str] = Counter()
    for s in stats.values():
        per_model.update({m: v["loads"] for m, v in s["models"].items() if v["loads"]})
    return {
        "loads": sum(s["loads_total"] for s in stats.values()),
        "evictions": sum(s["evictions_total"] for s in stats.values()),
        "loads_per_model": dict(sorted(per_model.items())),
        "loads_per_box": {n: s["loads_total"] for n, s in stats.items()},
        # Requests inside each server (preloads and unloads too), and those holding a slot.
        "peak_in_flight": {n: s["peak_in_flight"] for n, s in stats.items()},
        "peak_active": {n: s["peak_active"] for n, s in stats.items()},
        "parallelism": PARALLELISM,
    }


def _swaps_sent() -> dict[str, float]:
    """Unloads and preloads the instance workers sent so far (Corral's counters)."""
    from app.observe.metrics import job_store

    sent = {"unloads_sent": 0.0, "preloads_sent": 0.0}
    names = {
        "corral_model_unloads_sent_total": "unloads_sent",
        "corral_model_preloads_sent_total": "preloads_sent",
    }
    for family in job_store().collect():
        for sample in family.samples:
            if sample.name in names:
                sent[names[sample.name]] += sample.value
    return sent


def _timeline(fleet: LocalFleet, t0: float) -> dict[str, list[list[Any]]]:
    """Per box: ``[kind, model, start, end]`` of each load, unload and slot held, in seconds
    from the submission."""
    out = {}
    for name, url in fleet.sim_urls.items():
        events = requests.get(f"{url}/sim/events", timeout=10).json()["events"]
        out[name] = [[k, m, round(a - t0, 3), round(b - t0, 3)] for k, m, a, b in events]
    return out


def _median_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by makespan, with every run's makespan, loads and cold-job p95."""
    ranked = sorted(rows, key=lambda r: r["makespan_s"])
    summary = dict(ranked[len(ranked) // 2])
    summary["runs"] = len(rows)
    summary["makespan_each_s"] = [r["makespan_s"] for r in rows]
    summary["vs_ideal_each"] = [r["vs_ideal"] for r in rows]
    summary["loads_each"] = [r["loads"] for r in rows]
    summary["makespan_median_s"] = statistics.median(summary["makespan_each_s"])
    if all("cold_interactive" in r for r in rows):
        summary["cold_p95_each_s"] = [r["cold_interactive"]["p95_s"] for r in rows]
    return summary


def _through_corral(models: list[str], cold: int) -> dict[str, Any]:
    """Submit the batch at once, then ``cold`` interactive jobs for ``COLD``; wait for all."""
    from tasks import infer

    t0 = time.time()
    batch = [
        infer.delay(model=m, prompt=f"placement {i}", tier="batch") for i, m in enumerate(models)
    ]
    urgent = []
    for k in range(cold):
        time.sleep(max(0.0, t0 + COLD_FIRST_S + k * COLD_EVERY_S - time.time()))
        urgent.append(infer.delay(model=COLD, prompt=f"cold {k}", tier="interactive"))
    done: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    finished = []
    for model, job in zip(models, batch, strict=True):
        try:
            finished.append(job.get(timeout=900).routing.finished_at)
            done[model] += 1
        except Exception:  # counted: the report says which model's jobs did not complete
            failed[model] += 1
    waits = []
    for job in urgent:
        r = job.get(timeout=900)
        own = r.timings.prompt_eval_s + r.timings.eval_s
        waits.append(r.routing.wait_s + r.routing.service_s - own)
    return {
        "makespan_s": round(max(finished, default=t0) - t0, 2),
        "completed": dict(sorted(done.items())),
        "failed": dict(sorted(failed.items())),
        "cold_waits": waits,
        "t0": t0,
    }


def _through_proxy(proxy: Proxy, models: list[str], cold: int) -> dict[str, Any]:
    """The same jobs pushed at once through a least-connections proxy (tiers mean nothing)."""

    def call(model: str, prompt: str) -> tuple[float, float]:
        c = proxy.call(prompt, model=model, timeout=900)
        return time.time(), c.total_s - c.service_s

    with ThreadPoolExecutor(len(models) + cold) as pool:
        t0 = time.time()
        batch = [pool.submit(call, m, f"pplacement {i}") for i, m in enumerate(models)]
        urgent = []
        for k in range(cold):
            time.sleep(max(0.0, t0 + COLD_FIRST_S + k * COLD_EVERY_S - time.time()))
            urgent.append(pool.submit(call, COLD, f"pcold {k}"))
        done: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        finished = []
        for model, f in zip(models, batch, strict=True):
            try:
                finished.append(f.result(timeout=900)[0])
                done[model] += 1
            except Exception:  # counted, as for Corral
                failed[model] += 1
        waits = [f.result(timeout=900)[1] for f in urgent]
    return {
        "makespan_s": round(max(finished, default=t0) - t0, 2),
        "completed": dict(sorted(done.items())),
        "failed": dict(sorted(failed.items())),
        "cold_waits": waits,
        "t0": t0,
    }


def _scenario(
    tag: str, boxes: int, max_loaded: int, demand: dict[str, int], cold: int
) -> dict[str, Any]:

    served = list(demand) + ([COLD] if cold else [])
    sims = placement_fleet(tag, boxes, max_loaded, served)
    jobs = sum(demand.values())
    ideal = ideal_s(jobs, boxes)
    target = LOAD_S + 2 * SERVICE_S
    out: dict[str, Any] = {
        "fleet": f"{boxes} boxes of parallelism {PARALLELISM}, {max_loaded} model"
        f"{'s' if max_loaded > 1 else ''} at a time, {LOAD_S:g} s loads",
        "demand": demand,
        "jobs": jobs,
        "service_s": SERVICE_S,
        "ideal_s": round(ideal, 2),
        "runs": {},
    }
    if cold:
        out["cold_interactive"] = {
            "model": COLD,
            "jobs": cold,
            "first_after_s": COLD_FIRST_S,
            "every_s": COLD_EVERY_S,
            "target_wait_s": target,
        }
    order = shuffled(demand)
    with _stack(sims, tag) as fleet:
        proxy = Proxy(list(fleet.sim_urls.values()), "least_connections")
        labels = [f"corral {s}" for s in STRATEGIES] + ["proxy least_connections"]
        for label in labels:
            rows = []
            for _ in range(RUNS if label.startswith("corral") else 1):
                rows.append(_one_run(fleet, proxy, label, order, cold, demand, ideal))
                _echo(label, rows[-1], ideal, target)
            run = _median_run(rows)
            if len(rows) > 1:
                typer.echo(
                    f"  {label:24} median makespan {run['makespan_s']:6.2f}s ="
                    f" {run['vs_ideal']:5.2f} x ideal (runs: "
                    + ", ".join(f"{x:.2f}" for x in run["vs_ideal_each"])
                    + f"), loads {run['loads_each']}"
                )
            out["runs"][label] = run
    return out


def _one_run(
    fleet: LocalFleet,
    proxy: Proxy,
    label: str,
    order: list[str],
    cold: int,
    demand: dict[str, int],
    ideal: float,
) -> dict[str, Any]:
    from app.state.fleet import fleet_state

    _unload_all(fleet)
    before = _swaps_sent()
    if label.startswith("corral"):
        fleet_state().instances.set_strategy(label.removeprefix("corral "))
        run = _through_corral(order, cold)
    else:
        run = _through_proxy(proxy, order, cold)
    t0 = run.pop("t0")
    waits = run.pop("cold_waits")
    run["vs_ideal"] = round(run["makespan_s"] / ideal, 3)
    run |= _counters(fleet)
    run["all_models_completed"] = not run["failed"] and run["completed"] == dict(
        sorted(demand.items())
    )
    time.sleep(2 * get_settings().metrics_flush_seconds + 0.2)  # the workers' counters written
    after = _swaps_sent()
    run |= {k: int(after[k] - before[k]) for k in after}
    if waits:
        cold_run = _latency(waits, SERVICE_S)
        cold_run["p95_x_target"] = round(cold_run["p95_s"] / (LOAD_S + 2 * SERVICE_S), 2)
        run["cold_interactive"] = cold_run | {"wait_s": [round(w, 3) for w in waits]}
    run["timeline"] = _timeline(fleet, t0)
    return run


def _echo(label: str, run: dict[str, Any], ideal: float, target: float) -> None:
    peaks = ", ".join(
        f"{n} {run['peak_active'][n]}/{run['peak_in_flight'][n]}" for n in run["peak_active"]
    )
    line = (
        f"  {label:24} makespan {run['makespan_s']:6.2f}s = {run['vs_ideal']:5.2f} x ideal"
        f" ({ideal:.2f}s), loads {run['loads']}, evictions {run['evictions']}"
        f", all models completed: {run['all_models_completed']}"
        f"\n  {'':24} peak in a slot / in the server (parallelism {PARALLELISM}): {peaks}"
        f"; unloads sent {run['unloads_sent']}, preloads sent {run['preloads_sent']}"
    )
    if "cold_interactive" in run:
        c = run["cold_interactive"]
        line += (
            f"\n  {'':24} cold interactive wait p50 {c['p50_s']:5.2f}s"
            f" p95 {c['p95_s']:5.2f}s (target {target:.2f}s)"
        )
    typer.echo(line)


def run_placement() -> dict[str, Any]:
    typer.echo(f"  1. two models, {sum(TWO_MODELS.values())} jobs, boxes hold one model")
    two = _scenario("pl2", 3, 1, TWO_MODELS, cold=0)
    typer.echo(
        f"  2+3. five models, {sum(FIVE_MODELS.values())} jobs, boxes hold two models;"
        f" {COLD_JOBS} interactive jobs for a cold model meanwhile"
    )
    five = _scenario("pl5", 4, 2, FIVE_MODELS, cold=COLD_JOBS)
    return {"service_s": SERVICE_S, "load_s": LOAD_S, "two_models": two, "five_models": five}
