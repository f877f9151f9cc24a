"""Rate limits: the token buckets against real Redis, then the whole path with real workers.

A class that waits: its jobs start at its rate, parked in RabbitMQ delay queues, while
another agent's job is not held back. A class that refuses: ``infer.delay()`` raises
``RateLimited`` at the call and nothing is queued.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from celery.signals import before_task_publish

from app.bench.harness import LocalFleet, free_port, own_fleet
from app.errors import RateLimited
from app.policy import rate_limits
from app.policy.live import Policy
from app.settings import Settings, get_settings
from app.state import keys
from app.state.fleet import redis_client
from tasks import infer

MODEL = "llama3.2:3b"
CLASSES = {
    "heavy": {"agents": ["opus-*"], "agent_rate_per_minute": 60},  # 1 a second, burst 10
    "strict": {"agents": ["strict-*"], "rate_per_minute": 6, "on_limit": "refuse"},
}


@pytest.fixture
def classes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CORRAL_AGENT_CLASSES", json.dumps(CLASSES))
    monkeypatch.setenv("CORRAL_NAMESPACE", f"lim{os.getpid()}x{time.monotonic_ns()}")
    get_settings.cache_clear()
    yield
    redis = redis_client(get_settings().redis_url)
    for key in redis.scan_iter(keys.rate_all(get_settings().namespace)):
        redis.delete(key)
    get_settings.cache_clear()


def test_a_bucket_gives_its_burst_then_paces_reservations(classes: None) -> None:
    waits = [rate_limits.take("opus-1", "heavy", refuse=False) for _ in range(13)]
    assert waits[:10] == [0.0] * 10  # 10 s worth at 1 a second
    # Then one more second per reservation (a little less: time passed meanwhile).
    assert [round(w) for w in waits[10:]] == [1, 2, 3]
    # Another agent of the class has a bucket of its own.
    assert rate_limits.take("opus-2", "heavy", refuse=False) == 0.0


def test_refusing_takes_nothing(classes: None) -> None:
    assert rate_limits.take("strict-1", "strict", refuse=True) == 0.0  # burst of 1 (6 a minute)
    first = rate_limits.take("strict-1", "strict", refuse=True)
    second = rate_limits.take("strict-1", "strict", refuse=True)
    assert 9 < first <= 10 and abs(second - first) < 0.5  # refused twice: nothing taken


def test_agents_find_their_class() -> None:
    policy = Policy.from_settings(Settings(agent_classes=CLASSES))
    assert policy.class_of("opus-7") == "heavy"
    assert policy.class_of("opus-7", declared="strict") == "strict"  # an API key's class
    assert policy.class_of("sonnet-3") == "default"
    name, limits_of = policy.class_limits("strict-2")
    assert name == "strict" and limits_of is not None and limits_of.on_limit == "refuse"


@pytest.fixture(scope="module")
def limited_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    sims = [
        {
            "name": name,
            "port": free_port(),
            "num_parallel": 2,
            "preloaded": [MODEL],
            "models": [{"name": MODEL, "kind": "chat", "tokens_per_second": 400.0}],
        }
        for name in ("lim-a", "lim-b")
    ]
    classes = {
        "heavy": {"agents": ["opus-*"], "agent_rate_per_minute": 30},  # 1 per 2 s
        "capped": {"agents": ["etl-*"], "max_in_flight": 1},  # a bulkhead of one slot
        "strict": {"agents": ["strict-*"], "rate_per_minute": 6, "on_limit": "refuse"},
    }
    workdir: Path = tmp_path_factory.mktemp("limited")
    with own_fleet(
        workdir,
        sims,
        CORRAL_NAMESPACE=f"limf{os.getpid()}",
        CORRAL_AGENT_CLASSES=json.dumps(classes),
    ) as fleet:
        yield fleet


@pytest.mark.fleet
def test_a_limited_agent_waits_its_turn_without_holding_back_others(
    limited_fleet: LocalFleet,
) -> None:
    # 30 a minute with a burst of 5: the first 5 start at once, then one every 2 s.
    heavy = [
        infer.delay(model=MODEL, prompt=f"heavy {i}", agent="opus-1", cache=False) for i in range(8)
    ]
    time.sleep(0.5)
    light = infer.delay(model=MODEL, prompt="light", agent="sonnet-1", cache=False)
    light_result = light.get(timeout=30)
    results = [j.get(timeout=60) for j in heavy]

    starts = sorted(r.routing.finished_at - r.routing.service_s for r in results)
    assert starts[5] - starts[0] >= 1.5 and starts[7] - starts[0] >= 5.5, starts
    assert light_result.routing.wait_s < 1.5  # not queued behind opus-1's limit
    assert len({r.id for r in results}) == 8
    stats = [limited_fleet.sim_stats(n)["requests_total"] for n in limited_fleet.sim_urls]
    assert sum(stats) == 9  # each job ran once


@pytest.mark.fleet
def test_a_refusing_class_raises_at_the_call_and_queues_nothing(
    limited_fleet: LocalFleet,
) -> None:
    assert infer.delay(model=MODEL, prompt="first", agent="strict-1").get(timeout=30).text
    published: list[object] = []

    def record(**kwargs: object) -> None:
        published.append(kwargs)

    before_task_publish.connect(record, weak=False)
    try:
        with pytest.raises(RateLimited, match="retry in") as info:
            infer.delay(model=MODEL, prompt="second", agent="strict-1")
    finally:
        before_task_publish.disconnect(record)
    assert published == [] and 5 < info.value.retry_after <= 10


@pytest.mark.fleet
def test_a_class_at_its_bulkhead_cap_never_holds_more_slots(limited_fleet: LocalFleet) -> None:
    for name in limited_fleet.sim_urls:
        limited_fleet.faults(name, slow_factor=20.0)  # ~0.3 s a job
    try:
        capped = [
            infer.delay(model=MODEL, prompt=f"etl {i}", agent="etl-1", cache=False)
            for i in range(5)
        ]
        time.sleep(0.2)
        other = infer.delay(model=MODEL, prompt="other", agent="sonnet-2", cache=False)
        other_result = other.get(timeout=30)
        runs = sorted(
            (r.routing.finished_at - r.routing.service_s, r.routing.finished_at)
            for r in (j.get(timeout=60) for j in capped)
        )
    finally:
        limited_fleet.clear_faults()
    # One at a time, though 4 slots were free: each started after the previous one ended.
    assert all(start >= end - 0.01 for (_, end), (start, _) in pairwise(runs)), runs
    assert other_result.routing.wait_s < 1.0  # the other class was not held back
