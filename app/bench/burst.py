"""``corral bench --scenario burst``: a burst nobody planned for, Corral vs a proxy.

700 jobs land at once on 3 simulated instances of parallelism 2 (0.1 s a job), with an
interactive job every 0.5 s while they drain: once all at the ``normal`` tier (the gateway's
default, which is how a few hundred plain Ollama clients arrive), once spread over the three
tiers. Each burst goes once through Corral and once through a least-connections proxy.

Figures, from the simulators' own records of when each request held a slot:

* time to drain: from the first submission to the last answer;
* idle slot-time share while work waits: between the first submission and the start of the
  last job (work is waiting all that time), the share of the fleet's slot-seconds in which
  no request held the slot. Corral must keep it near its per-job gap; a level that holds
  admitted work shows up here as slots idling while the backlog stays;
* the interactive jobs' wait (submission to start) during the burst;
* the highest degradation level seen, and how long after the drain it was back to 0.

The load tests (``tests/test_load.py``) run the same functions on the test fleet.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import requests
import typer
from celery.result import AsyncResult

from app.bench.fleet import MIX, Proxy, ProxyCall, _stack, backlog_fleet
from app.bench.stats import percentile

BURST_JOBS = 700
SERVICE_S = 0.1
PROBE_EVERY_S = 0.5
#: The bursts: jobs per tier.
BURSTS: dict[str, dict[str, int]] = {
    "normal": {"normal": BURST_JOBS},
    "mixed": {"interactive": 100, "normal": 300, "batch": 300},
}

Span = tuple[float, float]


def idle_share(spans: dict[str, list[Span]], slots: dict[str, int], since: float) -> dict[str, Any]:
    """The share of slot-time idle while work waited (pure).

    Work waits from ``since`` (the burst's first submission) until the last request that
    started after it started: until then at least that request was waiting. ``spans`` are
    each instance's (taken, freed) slot times, ``slots`` its parallelism.
    """
    starts = [s for rows in spans.values() for s, _ in rows if s >= since]
    if not starts:
        return {"idle_share": 0.0, "waited_s": 0.0}
    until = max(starts)
    window = until - since
    if window <= 0:
        return {"idle_share": 0.0, "waited_s": 0.0}
    busy = sum(max(0.0, min(e, until) - max(s, since)) for rows in spans.values() for s, e in rows)
    capacity = sum(slots.values()) * window
    return {"idle_share": round(max(0.0, 1 - busy / capacity), 4), "waited_s": round(window, 3)}


def slot_gaps(spans: dict[str, list[Span]], slots: dict[str, int], since: float) -> dict[str, Any]:
    """Milliseconds from a job's end to the next job's start on the same slot (pure).

    Per instance, the spans in order of start: while all its slots are taken, the next
    request takes the slot that freed first, so its gap is its start minus that slot's end.
    Counted between ``since`` (the burst's first submission) and the last start, when work
    was waiting; a proxy queueing inside Ollama pays none, Corral pays its hand-off.
    """
    starts = [s for rows in spans.values() for s, _ in rows if s >= since]
    until = max(starts, default=since)
    gaps: list[float] = []
    for name, rows in spans.items():
        ends: list[float] = []  # the instance's slots, as the time each is free again
        for start, end in sorted(rows):
            if len(ends) == slots[name]:
                freed = heapq.heappop(ends)
                if since <= freed and start <= until:
                    gaps.append(max(0.0, start - freed) * 1000)
            heapq.heappush(ends, end)
    if not gaps:
        return {"slot_gap_p50_ms": 0.0, "slot_gap_p95_ms": 0.0, "slot_gaps": 0}
    return {
        "slot_gap_p50_ms": round(percentile(gaps, 50), 2),
        "slot_gap_p95_ms": round(percentile(gaps, 95), 2),
        "slot_gaps": len(gaps),
    }


def fleet_spans(urls: dict[str, str]) -> tuple[dict[str, list[Span]], dict[str, int]]:
    """Every simulator's slot spans and parallelism (``/sim/spans``)."""
    spans, slots = {}, {}
    for name, url in urls.items():
        body = requests.get(url + "/sim/spans", timeout=10).json()
        spans[name] = [(s, e) for s, e in body["spans"]]
        slots[name] = body["num_parallel"]
    return spans, slots


class LevelWatch:
    """The highest degradation level seen while it runs (read fresh every 0.1 s)."""

    def __init__(self) -> None:
        from app.policy.degradation import degradation

        self._levels = degradation()
        self.highest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.highest = max(self.highest, self._levels.level(fresh=True))

    def __enter__(self) -> LevelWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def back_to_normal(self, timeout: float) -> float | None:
        """Seconds until the level is 0 again, or None if not within ``timeout``."""
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self._levels.level(fresh=True) == 0:
                return round(time.monotonic() - t, 1)
            time.sleep(0.2)
        return None


def burst_through_corral(
    model: str, per_tier: dict[str, int], urls: dict[str, str], timeout: float = 600
) -> dict[str, Any]:
    """Submit ``per_tier`` jobs at once, probe with interactive jobs until they drain."""
    from tasks import infer

    with LevelWatch() as levels:
        t0 = time.time()
        burst = [
            infer.delay(model=model, prompt=f"{tier} {i}", tier=tier, agent=f"burst-{i % 20}")
            for tier, n in per_tier.items()
            for i in range(n)
        ]
        probes: list[AsyncResult[Any]] = []
        while not all(j.ready() for j in burst[-10:]) and time.time() - t0 < timeout:
            probes.append(
                infer.delay(model=model, prompt=f"probe {len(probes)}", tier="interactive")
            )
            time.sleep(PROBE_EVERY_S)
        results = [j.get(timeout=max(1.0, timeout - (time.time() - t0))) for j in burst + probes]
        drained = max(r.routing.finished_at for r in results) - t0
    spans, slots = fleet_spans(urls)
    waits = [r.routing.wait_s for r in results[len(burst) :]]
    return {
        "jobs": len(burst),
        "drain_s": round(drained, 2),
        **idle_share(spans, slots, t0),
        **slot_gaps(spans, slots, t0),
        **_waits(waits),
        "highest_level": levels.highest,
        "level_back_to_0_after_s": levels.back_to_normal(120),
    }


def burst_through_proxy(proxy: Proxy, jobs: int, urls: dict[str, str]) -> dict[str, Any]:
    """The same burst pushed through a least-connections proxy: tiers mean nothing to it."""
    with ThreadPoolExecutor(jobs + 200) as pool:
        t0 = time.time()
        burst = [pool.submit(proxy.call, f"pburst {i}") for i in range(jobs)]
        probes: list[Future[ProxyCall]] = []
        while not all(f.done() for f in burst[-10:]) and len(probes) < 200:
            probes.append(pool.submit(proxy.call, f"pprobe {len(probes)}"))
            time.sleep(PROBE_EVERY_S)
        calls = [f.result(timeout=600) for f in burst + probes]
    drained = time.time() - t0
    spans, slots = fleet_spans(urls)
    return {
        "jobs": jobs,
        "drain_s": round(drained, 2),
        **idle_share(spans, slots, t0),
        **slot_gaps(spans, slots, t0),
        **_waits([c.wait_s for c in calls[jobs:]]),
    }


def _waits(values: Iterable[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {
        "interactive_jobs": len(ms),
        "interactive_wait_p50_ms": round(percentile(ms, 50), 1),
        "interactive_wait_p95_ms": round(percentile(ms, 95), 1),
    }


def run_burst() -> dict[str, Any]:
    sims = backlog_fleet(SERVICE_S)
    out: dict[str, Any] = {
        "fleet": "3 instances of parallelism 2",
        "service_s": SERVICE_S,
        "ideal_drain_s": round(BURST_JOBS * SERVICE_S / 6, 2),
        "bursts": {},
    }
    with _stack(sims, "burst") as fleet:
        proxy = Proxy(list(fleet.sim_urls.values()), "least_connections")
        for name, per_tier in BURSTS.items():
            fleet.reset_sims()
            corral = burst_through_corral(MIX, per_tier, fleet.sim_urls)
            fleet.reset_sims()
            baseline = burst_through_proxy(proxy, sum(per_tier.values()), fleet.sim_urls)
            out["bursts"][name] = {
                "per_tier": per_tier,
                "corral": corral,
                "proxy_least_connections": baseline,
            }
            for label, r in (("corral", corral), ("least-connections proxy", baseline)):
                typer.echo(
                    f"  {name:7} {label:24} drained in {r['drain_s']:6.2f}s, idle slot-time"
                    f" {r['idle_share']:.1%} while work waited, slot gap p50"
                    f" {r['slot_gap_p50_ms']:.1f} ms p95 {r['slot_gap_p95_ms']:.1f} ms,"
                    " interactive wait"
                    f" p50 {r['interactive_wait_p50_ms']:.0f} ms"
                    f" p95 {r['interactive_wait_p95_ms']:.0f} ms"
                    + (f", highest level {r['highest_level']}" if "highest_level" in r else "")
                )
    return out
