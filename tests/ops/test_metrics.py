"""``corral metrics`` against the real fleet: scrape, run real jobs, scrape again.

The workers are the harness's subprocesses started with the production CLI, so the job
metrics seen here were recorded by real router and instance workers and summed in Redis.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests

from app.bench.harness import LocalFleet
from app.errors import RetriesExhausted
from tasks import infer

pytestmark = pytest.mark.fleet

CHAT = "llama3.2:3b"
EMBED = "nomic-embed-text:latest"
TIERS = ("interactive", "normal", "batch")


def all_free(fleet: LocalFleet) -> Callable[[Any], bool]:
    return lambda s: all(
        s.get("corral_instance_free_slots", instance=n) == 2 for n in fleet.sim_urls
    )


def test_fleet_gauges_describe_the_running_fleet(healthy_fleet: LocalFleet, metrics: Any) -> None:
    s = metrics.wait_for(all_free(healthy_fleet), "every slot free")
    assert s.get("corral_metrics_source_up", source="redis") == 1
    assert s.get("corral_metrics_source_up", source="rabbitmq") == 1
    for name in healthy_fleet.sim_urls:
        assert s.get("corral_instance_capacity", instance=name) == 2
        assert s.get("corral_instance_up", instance=name) == 1
        assert s.get("corral_instance_healthy", instance=name) == 1
        assert s.get("corral_instance_jobs_in_flight", instance=name) == 0
        assert s.get("corral_instance_breaker_state", instance=name, state="closed") == 1
        assert s.get("corral_instance_breaker_state", instance=name, state="open") == 0
    for tier in TIERS:
        # The router of each tier consumes the queue of each model.
        assert s.get("corral_queue_consumers", model=CHAT, tier=tier) >= 1
        assert s.get("corral_queue_depth", model=CHAT, tier=tier) == 0
    assert s.has("corral_dead_letter_queue_depth")
    assert s.get("corral_waiting_jobs", model=CHAT) == 0


def test_job_outcomes_latencies_and_routing_decisions(
    healthy_fleet: LocalFleet, metrics: Any
) -> None:
    before = metrics.scrape()
    jobs = [infer.delay(model=CHAT, prompt=f"hi {i}", tier="normal") for i in range(6)]
    results = [j.get(timeout=30) for j in jobs]
    labels = {"model": CHAT, "tier": "normal"}

    # Recorded by the worker and by the router, each writing its sums every
    # metrics_flush_seconds: wait for both.
    after = metrics.wait_for(
        lambda s: (
            s.get("corral_job_duration_seconds_count", **labels)
            >= before.get("corral_job_duration_seconds_count", **labels) + 6
            and s.total("corral_routing_decisions_total")
            >= before.total("corral_routing_decisions_total") + 6
        ),
        "six job durations and routing decisions",
    )

    def delta(name: str, **extra: str) -> float:
        return after.get(name, **extra) - before.get(name, **extra)

    assert delta("corral_jobs_finished_total", outcome="succeeded", **labels) == 6
    for phase in ("wait", "service", "duration"):
        assert delta(f"corral_job_{phase}_seconds_count", **labels) == 6
    # The histograms hold exactly what the callers got back in InferResult.routing.
    wait = sum(r.routing.wait_s for r in results)
    service = sum(r.routing.service_s for r in results)
    assert delta("corral_job_wait_seconds_sum", **labels) == pytest.approx(wait, abs=1e-4)
    assert delta("corral_job_service_seconds_sum", **labels) == pytest.approx(service, abs=1e-4)
    assert delta("corral_job_duration_seconds_sum", **labels) == pytest.approx(
        wait + service, abs=1e-4
    )
    assert delta("corral_job_service_seconds_bucket", le="+Inf", **labels) == 6

    # One routing decision per job, for the instance it ran on.
    per_instance = Counter((r.routing.strategy, r.routing.instance) for r in results)
    for (strategy, instance), n in per_instance.items():
        assert delta("corral_routing_decisions_total", strategy=strategy, instance=instance) == n

    metrics.wait_for(all_free(healthy_fleet), "the slots freed")


def test_backlog_shows_in_queue_depth_slots_and_waiters(
    healthy_fleet: LocalFleet, metrics: Any
) -> None:
    # ~2 s a job: 6 run, 16 wait in the batch router's threads (its concurrency), the rest
    # stays ready in RabbitMQ.
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=100.0)
    jobs = [infer.delay(model=CHAT, prompt=f"backlog {i}", tier="batch") for i in range(26)]
    try:
        busy = metrics.wait_for(
            lambda s: (
                s.total("corral_instance_jobs_in_flight") == 6
                and s.get("corral_queue_depth", model=CHAT, tier="batch") >= 1
                and s.get("corral_waiting_jobs", model=CHAT) >= 1
            ),
            "a backlog in the batch queue with every slot taken",
            timeout=30,
        )
        assert busy.total("corral_instance_free_slots") == 0
    finally:
        for name in healthy_fleet.sim_urls:
            healthy_fleet.faults(name, slow_factor=1.0)
    assert all(j.get(timeout=120).text for j in jobs)
    metrics.wait_for(
        lambda s: (
            s.get("corral_queue_depth", model=CHAT, tier="batch") == 0
            and s.get("corral_waiting_jobs", model=CHAT) == 0
            and s.total("corral_instance_free_slots") == 6
        ),
        "the backlog drained",
    )


def test_retries_and_dead_letters_are_counted(healthy_fleet: LocalFleet, metrics: Any) -> None:
    before = metrics.scrape()
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    job = infer.delay(model=CHAT, prompt="fails everywhere")
    with pytest.raises(RetriesExhausted):
        job.get(timeout=60)
    labels = {"model": CHAT, "tier": "normal"}
    dead = {"error": "RetriesExhausted", **labels}
    after = metrics.wait_for(
        lambda s: (
            s.get("corral_jobs_finished_total", outcome="failed", **labels)
            > before.get("corral_jobs_finished_total", outcome="failed", **labels)
            and s.total("corral_job_retries_total", error="InstanceFailed", **labels)
            >= before.total("corral_job_retries_total", error="InstanceFailed", **labels) + 2
            and s.get("corral_jobs_dead_lettered_total", **dead)
            > before.get("corral_jobs_dead_lettered_total", **dead)
        ),
        "the failure, its retries and its dead letter recorded",
    )
    # Three attempts on three instances: two went back to the router, the last gave up.
    retries = after.total("corral_job_retries_total", error="InstanceFailed", **labels)
    assert retries - before.total("corral_job_retries_total", error="InstanceFailed", **labels) == 2
    assert after.get("corral_jobs_dead_lettered_total", **dead) == (
        before.get("corral_jobs_dead_lettered_total", **dead) + 1
    )
    assert (
        after.get("corral_dead_letter_queue_depth")
        == before.get("corral_dead_letter_queue_depth") + 1
    )


def test_cache_hits_and_misses_are_counted(healthy_fleet: LocalFleet, metrics: Any) -> None:
    before = metrics.scrape()
    same = {"model": EMBED, "kind": "embed", "input": [f"cache {time.time()}"]}
    first = infer.delay(**same).get(timeout=30)
    second = infer.delay(**same).get(timeout=30)
    assert not first.cached and second.cached
    cached = {"model": EMBED, "tier": "normal", "outcome": "cached"}
    after = metrics.wait_for(
        lambda s: all(
            s.get(name, **key) > before.get(name, **key)
            for name, key in [
                ("corral_cache_lookups_total", {"model": EMBED, "result": "hit"}),
                ("corral_cache_lookups_total", {"model": EMBED, "result": "miss"}),
                ("corral_jobs_finished_total", cached),
            ]
        ),
        "the cache hit, miss and cached answer recorded",
    )
    for result in ("hit", "miss"):
        key = {"model": EMBED, "result": result}
        assert after.get("corral_cache_lookups_total", **key) == (
            before.get("corral_cache_lookups_total", **key) + 1
        )
    assert after.get("corral_jobs_finished_total", **cached) == (
        before.get("corral_jobs_finished_total", **cached) + 1
    )


def test_an_open_circuit_breaker_shows(healthy_fleet: LocalFleet, metrics: Any) -> None:
    healthy_fleet.faults("sim-c", error_rate=1.0)
    # Jobs until sim-c failed breaker_threshold (3) times in a row; they succeed elsewhere.
    for i in range(40):
        infer.delay(model=CHAT, prompt=f"trip {i}", cache=False).get(timeout=30)
        if healthy_fleet.sim_stats("sim-c")["errors_total"] >= 3:
            break
    s = metrics.wait_for(
        lambda s: s.get("corral_instance_breaker_state", instance="sim-c", state="open") == 1,
        "sim-c's breaker to show open",
    )
    assert s.get("corral_instance_breaker_state", instance="sim-c", state="closed") == 0


def test_model_loads_and_evictions_are_counted(healthy_fleet: LocalFleet, metrics: Any) -> None:
    """sim-a's worker sees the chat model leave /api/ps (an eviction), then come back (a load)."""
    url = healthy_fleet.sim_urls["sim-a"]
    key = {"instance": "sim-a", "model": CHAT}

    def ask(keep_alive: int) -> None:
        # An empty prompt only loads (keep_alive -1: for good, as preloaded) or unloads (0).
        body = {"model": CHAT, "keep_alive": keep_alive}
        requests.post(f"{url}/api/generate", json=body, timeout=10).raise_for_status()

    before = metrics.scrape()
    try:
        ask(0)
        evicted = metrics.wait_for(
            lambda s: (
                s.get("corral_model_evictions_total", **key)
                > before.get("corral_model_evictions_total", **key)
            ),
            "sim-a's eviction counted",
        )
    finally:
        ask(-1)
    loaded = metrics.wait_for(
        lambda s: (
            s.get("corral_model_loads_total", **key) > before.get("corral_model_loads_total", **key)
        ),
        "sim-a's load counted",
    )
    assert evicted.get("corral_model_evictions_total", **key) == (
        before.get("corral_model_evictions_total", **key) + 1
    )
    assert loaded.get("corral_model_loads_total", **key) == (
        before.get("corral_model_loads_total", **key) + 1
    )
    assert healthy_fleet.sim_stats("sim-a")["loads_total"] == 1
    # Nothing changed on the other instances.
    for other in ("sim-b", "sim-c"):
        assert loaded.total("corral_model_loads_total", instance=other) == before.total(
            "corral_model_loads_total", instance=other
        )
