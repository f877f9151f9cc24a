"""Fleet scenarios for ``corral bench``: Corral against a plain proxy, side by side.

* ``mixed``: 500 jobs on a mixed fleet (2 fast instances, 2 four times slower, 1 fast but with
  the model cold), once per routing strategy, and once through a plain round-robin proxy and
  a least-connections proxy. Reports makespan against the ideal (total work / total capacity)
  and cold loads.
* ``backlog``: interactive jobs arriving behind 500 queued batch jobs, through Corral and
  through a least-connections proxy (which can only leave the backlog queued inside Ollama).
  Records every job's wait by tier and each instance's requests in flight over time, for
  the plot (``app.bench.report``).
* ``agents`` (``app.bench.agents``): 131 agents of two classes, with rate limits and a
  bulkhead, on the backlog scenario's fleet.

The proxies are in-process stand-ins for nginx-style balancers: every request goes straight
to an instance (round-robin, or the one with the fewest requests outstanding), with no cap.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, cast

import requests
import typer

from app.bench.harness import LocalFleet, free_port, own_fleet
from app.bench.sampler import InFlightSampler

MIX = "mix:latest"
FAST_S, SLOW_S = 0.5, 2.0
ARRIVAL_S = 0.5  # between interactive jobs in the backlog scenario
#: Jobs in the mixed scenario's short batch: the warm boxes finish them in about the time
#: the cold box takes to load the model (3 s), so loading it there does not pay.
SHORT_BATCH = 20


def _model(tokens_per_second: float, load_seconds: float = 3.0) -> dict[str, Any]:
    return {
        "name": MIX,
        "kind": "chat",
        "tokens_per_second": tokens_per_second,
        "prompt_tokens_per_second": 0.0,
        "default_num_predict": 10,
        "load_seconds": load_seconds,
    }


def mixed_fleet() -> list[dict[str, Any]]:
    fast = _model(10 / FAST_S)
    spec = [
        ("fast-1", 1.0, True),
        ("fast-2", 1.0, True),
        ("slow-1", FAST_S / SLOW_S, True),
        ("slow-2", FAST_S / SLOW_S, True),
        ("cold-1", 1.0, False),
    ]
    return [
        {
            "name": n,
            "port": free_port(),
            "num_parallel": 2,
            "speed": speed,
            "parallel_slowdown": 0.0,
            "preloaded": [MIX] if warm else [],
            "models": [fast],
        }
        for n, speed, warm in spec
    ]


def backlog_fleet(service_s: float = 0.25) -> list[dict[str, Any]]:
    return [
        {
            "name": f"b-{c}",
            "port": free_port(),
            "num_parallel": 2,
            "parallel_slowdown": 0.0,
            "preloaded": [MIX],
            "models": [_model(10 / service_s)],
        }
        for c in "abc"
    ]


@contextmanager
def _stack(sims: list[dict[str, Any]], tag: str, **env: str) -> Iterator[LocalFleet]:
    """A stack of its own; ``env``: settings for it alone (e.g. agent classes), undone after
    so that the scenarios run next do not inherit them."""
    with own_fleet(
        Path(tempfile.mkdtemp(prefix=f"corral-{tag}-")),
        sims,
        CORRAL_NAMESPACE=f"bench{tag}{os.getpid()}",
        CORRAL_CACHE_ENABLED="false",
        **env,
    ) as fleet:
        yield fleet


def _unload(url: str) -> None:
    requests.post(f"{url}/api/generate", json={"model": MIX, "keep_alive": 0}, timeout=10)


class ProxyCall(NamedTuple):
    url: str
    total_s: float
    wait_s: float
    service_s: float = 0.0  # Ollama's own compute time for the request


class Proxy:
    """A push balancer without caps: what Corral replaces."""

    def __init__(self, urls: list[str], policy: str) -> None:
        self.urls, self.policy = urls, policy
        self.outstanding = Counter({u: 0 for u in urls})
        self._rr = itertools.cycle(urls)
        self._lock = threading.Lock()
        self._local = threading.local()

    def call(self, prompt: str, timeout: float = 600, model: str = MIX) -> ProxyCall:
        """One request; a ``timeout`` that passes closes it (requests.Timeout is raised), and
        the server stops working on it, as Ollama does for a client that leaves."""
        t = time.perf_counter()
        with self._lock:
            if self.policy == "round_robin":
                url = next(self._rr)
            else:
                url = min(self.urls, key=lambda u: self.outstanding[u])
            self.outstanding[url] += 1
        session = getattr(self._local, "s", None) or requests.Session()
        self._local.s = session
        try:
            resp = session.post(
                f"{url}/api/generate",
                json={"model": model, "prompt": prompt, "stream": False},
                timeout=timeout,
            )
            resp.raise_for_status()
        finally:
            with self._lock:
                self.outstanding[url] -= 1
        total = time.perf_counter() - t
        # Ollama's own timings cover the computation only; the rest of the round trip is the
        # time the request sat in the server's queue, which Corral counts as its wait.
        body = resp.json()
        service = (body.get("prompt_eval_duration", 0) + body.get("eval_duration", 0)) / 1e9
        return ProxyCall(url, total, max(0.0, total - service), service)


def _ideal(sims: list[dict[str, Any]], jobs: int) -> float:
    capacity: float = sum(s["num_parallel"] * s.get("speed", 1.0) / FAST_S for s in sims)
    return jobs / capacity


def run_mixed(jobs: int = 500, short: int = SHORT_BATCH) -> dict[str, Any]:
    """``jobs`` batch jobs per strategy and per proxy; then a ``short`` batch each, too small
    to be worth loading the model on the cold box (``cold_loads`` tells who loads it anyway)."""
    from app.state.fleet import fleet_state
    from routing import STRATEGIES

    sims = mixed_fleet()
    ideal = _ideal(sims, jobs)
    out: dict[str, Any] = {
        "jobs": jobs,
        "fleet": f"2 fast ({FAST_S} s a job), 2 four times slower, 1 fast with the model cold"
        "; parallelism 2",
        "ideal_s": round(ideal, 2),
        "runs": {},
        "short": {"jobs": short, "runs": {}},
    }
    with _stack(sims, "mix") as fleet:
        urls = fleet.sim_urls
        proxies = {p: Proxy(list(urls.values()), p) for p in ("round_robin", "least_connections")}
        by_url = {u: n for n, u in urls.items()}

        def run(
            label: str, n: int, into: dict[str, Any], send: Callable[[int], Counter[str]]
        ) -> None:
            _unload(urls["cold-1"])
            fleet.reset_sims()
            t = time.perf_counter()
            served = send(n)
            elapsed = time.perf_counter() - t
            loads = sum(fleet.sim_stats(s)["loads_total"] for s in urls)
            into[label] = {
                "makespan_s": round(elapsed, 2),
                "vs_ideal": round(elapsed / _ideal(sims, n), 3),
                "cold_loads": loads,
                "jobs_per_instance": dict(served),
            }
            typer.echo(
                f"  {n} jobs, {label:24} makespan {elapsed:6.2f}s"
                f" = {elapsed / _ideal(sims, n):5.3f} x ideal, cold loads {loads},"
                f" {dict(sorted(served.items()))}"
            )

        def through(proxy: Proxy) -> Callable[[int], Counter[str]]:
            def send(n: int) -> Counter[str]:
                with ThreadPoolExecutor(64) as pool:
                    hits = list(pool.map(proxy.call, (f"proxy {i}" for i in range(n))))
                return Counter(by_url[h.url] for h in hits)

            return send

        for n, into in ((jobs, out["runs"]), (short, out["short"]["runs"])):
            for strategy in STRATEGIES:
                fleet_state().instances.set_strategy(strategy)
                run(f"corral {strategy}", n, into, partial(corral_batch, strategy))
            for policy, proxy in proxies.items():
                run(f"proxy {policy}", n, into, through(proxy))
    return out


def corral_batch(strategy: str, jobs: int) -> Counter[str]:
    from tasks import infer

    pending = [infer.delay(model=MIX, prompt=f"{strategy} {i}", tier="batch") for i in range(jobs)]
    # Every job ran on an instance: only a cache answer names none, and no two prompts agree.
    return Counter(cast(str, r.get(timeout=600).routing.instance) for r in pending)


def run_backlog(batch: int = 500, interactive: int = 20, service_s: float = 0.25) -> dict[str, Any]:
    """Interactive jobs arriving every ``ARRIVAL_S`` behind ``batch`` jobs submitted at once."""
    sims = backlog_fleet(service_s)
    parallelism = {s["name"]: s["num_parallel"] for s in sims}
    out: dict[str, Any] = {
        "batch_jobs": batch,
        "interactive_jobs": interactive,
        "arrival_s": ARRIVAL_S,
        "service_s": service_s,
        "parallelism": parallelism,
    }
    with _stack(sims, "backlog") as fleet:
        with InFlightSampler(fleet.sim_urls, parallelism) as sampler:
            corral = _backlog_corral(batch, interactive, service_s)
        peaks = {n: fleet.sim_stats(n)["peak_in_flight"] for n in fleet.sim_urls}
        out["corral"] = corral | {"peak_in_flight": peaks, "in_flight": sampler.series()}

        fleet.reset_sims()
        proxy = Proxy(list(fleet.sim_urls.values()), "least_connections")
        with InFlightSampler(fleet.sim_urls, parallelism) as sampler:
            baseline = _backlog_proxy(proxy, batch, interactive, service_s)
        peaks = {n: fleet.sim_stats(n)["peak_in_flight"] for n in fleet.sim_urls}
        out["proxy_least_connections"] = baseline | {
            "peak_in_flight": peaks,
            "in_flight": sampler.series(),
        }
    for name in ("corral", "proxy_least_connections"):
        r = out[name]
        typer.echo(
            f"  {name:24} interactive total time p50 {r['p50_s']:6.2f}s "
            f"p95 {r['p95_s']:6.2f}s ({r['p95_x_service']:.1f} x service), "
            f"peak in flight {r['peak_in_flight']}"
        )
    return out


def _backlog_corral(batch: int, interactive: int, service_s: float) -> dict[str, Any]:
    """The backlog waits in RabbitMQ; interactive jobs take the next free slot."""
    from tasks import infer

    backlog = [infer.delay(model=MIX, prompt=f"batch {i}", tier="batch") for i in range(batch)]
    urgent = []
    for i in range(interactive):
        time.sleep(ARRIVAL_S)
        urgent.append(infer.delay(model=MIX, prompt=f"urgent {i}", tier="interactive"))
    urgent_results = [r.get(timeout=120) for r in urgent]
    queued_after = sum(not b.ready() for b in backlog)
    batch_results = [b.get(timeout=600) for b in backlog]
    totals = [r.routing.wait_s + r.routing.service_s for r in urgent_results]
    return _latency(totals, service_s) | {
        "batch_still_queued": queued_after,
        "wait_s": {
            "interactive": [round(r.routing.wait_s, 4) for r in urgent_results],
            "batch": [round(r.routing.wait_s, 4) for r in batch_results],
        },
    }


def _backlog_proxy(proxy: Proxy, batch: int, interactive: int, service_s: float) -> dict[str, Any]:
    """Everything is sent at once and queues inside Ollama, first come first served; the
    "interactive" requests are just more requests."""
    with ThreadPoolExecutor(batch + interactive) as pool:
        backlog = [pool.submit(proxy.call, f"pbatch {i}") for i in range(batch)]
        urgent = []
        for i in range(interactive):
            time.sleep(ARRIVAL_S)
            urgent.append(pool.submit(proxy.call, f"purgent {i}"))
        urgent_calls = [f.result(timeout=600) for f in urgent]
        batch_calls = [f.result(timeout=600) for f in backlog]
    return _latency([c.total_s for c in urgent_calls], service_s) | {
        "wait_s": {
            "interactive": [round(c.wait_s, 4) for c in urgent_calls],
            "batch": [round(c.wait_s, 4) for c in batch_calls],
        }
    }


def _latency(values: list[float], service_s: float) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {
        "n": len(values),
        "p50_s": round(q[49], 3),
        "p95_s": round(q[94], 3),
        "p95_x_service": round(q[94] / service_s, 2),
    }
