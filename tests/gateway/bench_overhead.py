"""What the gateway adds to a job (not collected by pytest: run it directly).

    .venv/bin/python tests/gateway/bench_overhead.py [--requests 100]

Starts its own stack under a namespace of its own (three zero-latency simulated instances,
their workers, the routers) and a gateway subprocess with API keys on, then times sequential
non-streaming generate jobs: ``infer.delay().get()`` in this process, the same job through
``POST /api/generate`` (one keep-alive connection) and a streamed one (time to the last
line), interleaved; and the gateway process's CPU time per request. Cache off, so every job
runs. The machine is shared and noisy: compare figures from one run with each other only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from app.bench.harness import LocalFleet, free_port, instances_env
    from app.bench.overhead import SIMS

    sims = [{**s, "port": free_port()} for s in SIMS]
    workdir = Path(tempfile.mkdtemp(prefix="corral-gw-bench-"))
    os.environ.update(
        {
            "CORRAL_NAMESPACE": f"gwbench{os.getpid()}",
            "CORRAL_INSTANCES": instances_env(sims),
            "CORRAL_CACHE_ENABLED": "false",
            "CORRAL_DATABASE_URL": f"sqlite:///{workdir}/corral.db",
        }
    )
    # Imported only now: settings are read from the environment set above.
    from app.bench.overhead import MODEL
    from app.bench.stats import percentile
    from app.gateway.api_keys import KeyStore
    from tests.gateway.conftest import start_gateway

    fleet = LocalFleet(workdir, dict(os.environ), sims)
    print(f"starting the stack and a gateway (logs in {workdir})")
    gateway = None
    try:
        fleet.start()
        key, _ = KeyStore.ready().add("bench", "bench", "interactive")
        gateway, url = start_gateway(workdir, "gateway", CORRAL_GATEWAY_AUTH="true")
        cpu = psutil.Process(gateway.proc.pid)  # type: ignore[union-attr]
        cpu_before = sum(cpu.cpu_times()[:2])
        report = measure(url, key, MODEL, args.requests)
        # Two gateway requests per round (plain and streamed), 20 warm-up rounds each.
        cpu_ms = (sum(cpu.cpu_times()[:2]) - cpu_before) * 1000 / (2 * (args.requests + 20))
    finally:
        if gateway is not None:
            gateway.stop()
        fleet.stop()
        fleet.purge()
    summary = {
        way: {
            "p50_ms": round(percentile(ms, 50), 2),
            "p95_ms": round(percentile(ms, 95), 2),
        }
        for way, ms in report.items()
    }
    base = summary["infer.delay().get()"]
    for way, figures in summary.items():
        extra = (
            f"  ({figures['p50_ms'] - base['p50_ms']:+.2f} / "
            f"{figures['p95_ms'] - base['p95_ms']:+.2f} ms)"
            if figures is not base
            else ""
        )
        print(f"{way:34} p50 {figures['p50_ms']:7.2f} ms  p95 {figures['p95_ms']:7.2f} ms{extra}")
    print(f"gateway CPU per request: {cpu_ms:.2f} ms")
    print(
        json.dumps(
            {
                "requests": args.requests,
                "cpus": os.cpu_count(),
                "gateway_cpu_ms_per_request": round(cpu_ms, 2),
                **summary,
            }
        )
    )


def measure(url: str, key: str, model: str, n: int) -> dict[str, list[float]]:
    import httpx

    from tasks import infer

    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    ways = {
        "infer.delay().get()": lambda i: infer.delay(
            model=model, prompt=f"direct {i}", tier="interactive"
        ).get(timeout=30),
        "gateway /api/generate": lambda i: _ok(
            http.post("/api/generate", json={"model": model, "prompt": f"gw {i}", "stream": False})
        ),
        "gateway /api/generate, streamed": lambda i: _drain(http, model, i),
    }
    for call in ways.values():  # warm connections, queues and code paths
        for i in range(20):
            call(-i - 1)
    times: dict[str, list[float]] = {way: [] for way in ways}
    for i in range(n):  # interleaved, so a noisy moment hits every way alike
        for way, call in ways.items():
            started = time.perf_counter()
            call(i)
            times[way].append((time.perf_counter() - started) * 1000)
    return times


def _ok(reply: object) -> None:
    assert reply.status_code == 200, reply.text  # type: ignore[attr-defined]


def _drain(http: object, model: str, i: int) -> None:
    body = {"model": model, "prompt": f"stream {i}"}
    with http.stream("POST", "/api/generate", json=body) as reply:  # type: ignore[attr-defined]
        assert reply.status_code == 200
        for _ in reply.iter_lines():
            pass


if __name__ == "__main__":
    main()
