"""``corral bench``: what the whole path costs, side by side with calling Ollama directly.

It starts its own stack (a zero-latency simulated fleet of 3 instances of parallelism 2, their
workers and the routers) under a namespace of its own, measures, and stops it. Figures from
one run are compared with each other only: the machine is shared and noisy.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
import typer

from app.bench.stats import percentile

if TYPE_CHECKING:
    from app.bench.harness import LocalFleet

MODEL = "bench:latest"
SIMS = [
    {
        "name": f"bench-{c}",
        "num_parallel": 2,
        "preloaded": [MODEL],
        "models": [
            {
                "name": MODEL,
                "kind": "chat",
                "tokens_per_second": 0.0,
                "prompt_tokens_per_second": 0.0,
                "default_num_predict": 4,
                "load_seconds": 0.0,
            }
        ],
    }
    for c in "abc"
]


def _summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "mean_ms": round(statistics.mean(ms), 2),
        "n": len(ms),
    }


def _direct_call(session: requests.Session, url: str, i: int) -> None:
    body = {"model": MODEL, "prompt": f"direct {i}", "stream": True}
    with session.post(f"{url}/api/generate", json=body, stream=True, timeout=30) as resp:
        for _ in resp.iter_lines():
            pass


def measure_latency(urls: list[str], n: int) -> dict[str, Any]:
    """Sequential round trips: direct HTTP, then the same through Corral."""
    from tasks import infer

    session = requests.Session()
    direct, corral = [], []
    for i in range(20):
        _direct_call(session, urls[0], i)
        infer.delay(model=MODEL, prompt=f"warm {i}", tier="interactive").get(timeout=30)
    for i in range(n):
        t = time.perf_counter()
        _direct_call(session, urls[i % len(urls)], i)
        direct.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        infer.delay(model=MODEL, prompt=f"seq {i}", tier="interactive").get(timeout=30)
        corral.append((time.perf_counter() - t) * 1000)
    d, c = _summary(direct), _summary(corral)
    overhead = {k: round(c[k] - d[k], 2) for k in ("p50_ms", "p95_ms", "mean_ms")}
    return {"direct": d, "corral": c, "overhead": overhead}


def _timed_stream(session: requests.Session, url: str, body: dict[str, Any]) -> tuple[float, float]:
    """(ms to the first line, ms to the last) of one streamed /api/generate."""
    t = time.perf_counter()
    first = None
    with session.post(f"{url}/api/generate", json=body, stream=True, timeout=30) as resp:
        resp.raise_for_status()
        for _ in resp.iter_lines():
            first = first or time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - t) * 1000, (end - t) * 1000


def _timed_whole(session: requests.Session, url: str, body: dict[str, Any]) -> float:
    t = time.perf_counter()
    session.post(f"{url}/api/generate", json=body, timeout=30).raise_for_status()
    return (time.perf_counter() - t) * 1000


def measure_gateway(sim_url: str, gateway_url: str, n: int) -> dict[str, Any]:
    """Sequential Ollama API requests, each straight to a simulator and then through the
    gateway: whole answers, and streams (time to the first line and to the last)."""
    session = requests.Session()
    ms: dict[str, list[float]] = {}
    for i in range(n + 20):
        for where, url in (("direct", sim_url), ("gateway", gateway_url)):
            prompt = f"gateway {i}"  # a new prompt each time: nothing comes from the cache
            whole = _timed_whole(session, url, {"model": MODEL, "prompt": prompt, "stream": False})
            ttft, total = _timed_stream(session, url, {"model": MODEL, "prompt": prompt + " s"})
            if i >= 20:  # the first 20 warm the connections and the fleet up
                for name, v in (("whole", whole), ("stream_first", ttft), ("stream", total)):
                    ms.setdefault(f"{where}_{name}", []).append(v)
    out: dict[str, Any] = {k: _summary(v) for k, v in ms.items()}
    for name in ("whole", "stream_first", "stream"):
        d, g = out[f"direct_{name}"], out[f"gateway_{name}"]
        out[f"overhead_{name}"] = {k: round(g[k] - d[k], 2) for k in ("p50_ms", "p95_ms")}
    return out


def measure_throughput(urls: list[str], n: int) -> dict[str, Any]:
    """Many jobs at once through Corral, and the same number straight at the simulators."""
    from tasks import infer

    def direct_worker(k: int) -> None:
        session = requests.Session()
        for i in range(k, n, 6):
            _direct_call(session, urls[i % len(urls)], i)

    t = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(direct_worker, range(6)))
    direct_rate = n / (time.perf_counter() - t)

    t = time.perf_counter()
    # Submitted at once in one bulk call: what is measured is the control plane moving the
    # jobs, not one client thread publishing them (the submission figures below).
    pending = infer.submit_many(
        [{"model": MODEL, "prompt": f"burst {i}", "tier": "batch"} for i in range(n)]
    )
    published = time.perf_counter() - t
    results = [r.get(timeout=300) for r in pending]
    elapsed = time.perf_counter() - t
    assert len({r.id for r in results}) == n
    return {
        "jobs": n,
        "corral_jobs_per_s": round(n / elapsed, 1),
        "publish_per_s": round(n / published, 1),
        "direct_requests_per_s": round(direct_rate, 1),
    }


def measure_decision_time(samples: int = 2000) -> dict[str, Any]:
    """``routing.rank`` on a 50-instance, 20-model fleet, per strategy."""
    import random

    from routing import STRATEGIES, FleetSnapshot, InstanceStats, rank

    rng = random.Random(1)
    models = [f"model-{m}:latest" for m in range(20)]
    snap = FleetSnapshot(
        tuple(
            InstanceStats(
                name=f"i{k}",
                capacity=2,
                in_flight=rng.randint(0, 2),
                models=frozenset(rng.sample(models, 8)),
                loaded=frozenset(rng.sample(models, 3)),
                ewma_ms=rng.uniform(100, 900),
                recent_errors=rng.randint(0, 2),
            )
            for k in range(50)
        ),
        time.time(),
    )
    out = {}
    for strategy in STRATEGIES:
        times = []
        for i in range(samples):
            t = time.perf_counter()
            rank(snap, models[i % 20], strategy=strategy, tick=i)
            times.append((time.perf_counter() - t) * 1e6)
        out[strategy] = {
            "p50_us": round(percentile(times, 50), 1),
            "p95_us": round(percentile(times, 95), 1),
        }
    return out


#: The agent of the submission measurement's jobs: counted for fairness, as an agent's are.
SUBMIT_AGENT = "bench-submitter"


def measure_submission(n: int, rounds: int = 3) -> dict[str, Any]:
    """Jobs published per second from one thread: ``infer.delay`` one job after another, and
    ``infer.submit_many`` with all of them, alternately, each round's jobs run to the end
    before the next round (the fleet's routers share the machine with this thread)."""
    from tasks import infer

    def requests(method: str, k: int) -> list[dict[str, Any]]:
        return [
            {"model": MODEL, "prompt": f"{method} {k}.{i}", "tier": "batch", "agent": SUBMIT_AGENT}
            for i in range(n)
        ]

    def delay(fields: list[dict[str, Any]]) -> list[Any]:
        return [infer.delay(**f) for f in fields]

    rates: dict[str, list[float]] = {"delay": [], "submit_many": []}
    cpu_ms: dict[str, list[float]] = {"delay": [], "submit_many": []}
    for k in range(rounds):
        for method, submit in (("delay", delay), ("submit_many", infer.submit_many)):
            fields = requests(method, k)
            wall, cpu = time.perf_counter(), time.process_time()
            sent = submit(fields)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rates[method].append(round(n / wall, 1))
            cpu_ms[method].append(round(cpu * 1000 / n, 3))
            assert len({r.get(timeout=300).id for r in sent}) == n
    return {
        "jobs": n,
        "rounds": rounds,
        **{
            method: {
                "jobs_per_s": rates[method],
                "median_jobs_per_s": statistics.median(rates[method]),
                "cpu_ms_per_job": cpu_ms[method],
            }
            for method in rates
        },
    }


@contextmanager
def _bench_stack() -> Iterator[LocalFleet]:
    """The benchmark's stack, under a namespace of its own; stopped and purged after."""
    from app.bench.harness import free_port, own_fleet

    sims = [{**s, "port": free_port()} for s in SIMS]
    workdir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    typer.echo(f"starting a benchmark stack (logs in {workdir})")
    with own_fleet(
        workdir,
        sims,
        CORRAL_NAMESPACE=f"bench{os.getpid()}",
        CORRAL_CACHE_ENABLED="false",
    ) as fleet:
        yield fleet


def run_benchmark(jobs: int = 400, sequential: int = 200, submitted: int = 1000) -> dict[str, Any]:
    from app.bench.harness import queue_counts, wait_until
    from app.queues import route_queue

    with _bench_stack() as fleet:
        urls = list(fleet.sim_urls.values())
        report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
        typer.echo("latency: sequential jobs, direct HTTP vs Corral...")
        report["latency"] = measure_latency(urls, sequential)
        typer.echo("latency through the gateway (Ollama API), sequential...")
        report["gateway"] = _through_gateway(fleet.workdir, urls[0], sequential)
        fleet.reset_sims()
        typer.echo(f"throughput: {jobs} jobs at once...")
        report["throughput"] = measure_throughput(urls, jobs)
        typer.echo(f"submission: {submitted} jobs from one thread, one by one and in one call...")
        report["submission"] = measure_submission(submitted)
        # The throughput jobs are batch jobs: what a second router of that tier adds.
        fleet.start_router("batch", name="router-batch-2")
        wait_until(lambda: queue_counts(route_queue(MODEL, "batch"))[1] == 2, 60, "router 2")
        typer.echo(f"throughput with two batch routers: {jobs} jobs at once...")
        report["throughput_two_routers"] = measure_throughput(urls, jobs)
        report["peak_in_flight"] = {
            name: {"peak": fleet.sim_stats(name)["peak_in_flight"], "parallelism": 2}
            for name in fleet.sim_urls
        }
        report["decision_time"] = measure_decision_time()
    _print(report)
    return report


def run_submission(submitted: int = 1000, rounds: int = 3) -> dict[str, Any]:
    """``corral bench --scenario submit``: the submission measurement alone, on the same stack."""
    with _bench_stack():
        typer.echo(f"submission: {submitted} jobs from one thread, one by one and in one call...")
        report = measure_submission(submitted, rounds)
    _print_submission(report)
    return report


def _through_gateway(workdir: Path, sim_url: str, n: int) -> dict[str, Any]:
    from app.bench.harness import _answers, free_port, wait_until
    from app.bench.stack import Child

    port = free_port()
    env = dict(os.environ, CORRAL_GATEWAY_AUTH="false")
    argv = [sys.executable, "-m", "app.cli", "gateway", "--port", str(port), "--no-access-log"]
    child = Child("gateway", argv, env, log_dir=workdir)
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url + "/api/version"), 30, "the gateway")
        return measure_gateway(sim_url, url, n)
    finally:
        child.stop()


def _print(r: dict[str, Any]) -> None:
    lat = r["latency"]
    typer.echo("\nper-job latency, sequential, zero-latency backend")
    typer.echo(
        f"  direct HTTP   p50 {lat['direct']['p50_ms']:7.2f} ms  p95 "
        f"{lat['direct']['p95_ms']:7.2f} ms"
    )
    typer.echo(
        f"  Corral        p50 {lat['corral']['p50_ms']:7.2f} ms  p95 "
        f"{lat['corral']['p95_ms']:7.2f} ms"
    )
    typer.echo(
        f"  overhead      p50 {lat['overhead']['p50_ms']:7.2f} ms  p95 "
        f"{lat['overhead']['p95_ms']:7.2f} ms"
    )
    g = r.get("gateway")
    if g:
        typer.echo("\nthrough the gateway (Ollama API), sequential: overhead over direct")
        for name, label in (
            ("whole", "stream: false"),
            ("stream", "stream, to the end"),
            ("stream_first", "stream, first line"),
        ):
            o = g[f"overhead_{name}"]
            typer.echo(
                f"  {label:20} p50 {o['p50_ms']:7.2f} ms  p95 {o['p95_ms']:7.2f} ms"
                f"  (direct p50 {g[f'direct_{name}']['p50_ms']:.2f} ms)"
            )
    t = r["throughput"]
    typer.echo(
        f"\nthroughput, {t['jobs']} jobs: Corral {t['corral_jobs_per_s']} jobs/s "
        f"(publish {t['publish_per_s']}/s); direct HTTP {t['direct_requests_per_s']} req/s"
    )
    t2 = r.get("throughput_two_routers")
    if t2:
        typer.echo(f"  with two batch routers: Corral {t2['corral_jobs_per_s']} jobs/s")
    typer.echo(
        "peak in flight: "
        + ", ".join(f"{n} {v['peak']}/{v['parallelism']}" for n, v in r["peak_in_flight"].items())
    )
    typer.echo(
        "routing decision, 50 instances x 20 models: "
        + ", ".join(f"{s} p50 {v['p50_us']} us" for s, v in r["decision_time"].items())
    )
    _print_submission(r["submission"])


def _print_submission(s: dict[str, Any]) -> None:
    typer.echo(f"\njobs published from one thread, {s['jobs']} jobs, {s['rounds']} rounds:")
    for method, name in (
        ("delay", "infer.delay, one by one"),
        ("submit_many", "infer.submit_many"),
    ):
        m = s[method]
        typer.echo(
            f"  {name:24} median {m['median_jobs_per_s']:7.1f} jobs/s (rounds {m['jobs_per_s']}),"
            f" CPU {m['cpu_ms_per_job']} ms a job"
        )
