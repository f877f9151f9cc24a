"""Jobs that wait for a slot longer than RabbitMQ's consumer timeout.

RabbitMQ closes a channel whose delivery stays unacked longer than ``consumer_timeout``
(30 min by default), and every job held on it is redelivered: a router holding a batch job
through a long backlog would lose its channel. Here the broker's timeout is set to 4 s
while this test's fleet opens its channels (a channel reads it when it opens; the broker
default is restored right after), and jobs wait for a slot much longer than that.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench.harness import LocalFleet, free_port, own_fleet
from tasks import infer

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
BROKER_TIMEOUT_S = 4


def _rabbit(setting: str, value: int) -> None:
    expr = f"application:set_env(rabbit, {setting}, {value})."
    subprocess.run(["rabbitmqctl", "eval", expr], check=True, capture_output=True, timeout=30)


@pytest.fixture
def short_timeout_fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    sims = [
        {
            "name": "ct-a",
            "port": free_port(),
            "num_parallel": 1,
            "preloaded": [MODEL],
            "models": [{"name": MODEL, "kind": "chat", "tokens_per_second": 10.0}],
        }
    ]
    # A channel checks its deliveries on every tick (each 60 s by default): tick each second.
    _rabbit("channel_tick_interval", 1000)
    _rabbit("consumer_timeout", BROKER_TIMEOUT_S * 1000)
    try:
        with own_fleet(
            tmp_path,
            sims,
            CORRAL_NAMESPACE=f"cto{os.getpid()}",
            CORRAL_BROKER_CONSUMER_TIMEOUT=str(BROKER_TIMEOUT_S),
        ) as fleet:
            _rabbit("consumer_timeout", 1_800_000)  # for the channels opened from now on
            yield fleet
    finally:
        _rabbit("consumer_timeout", 1_800_000)
        _rabbit("channel_tick_interval", 60_000)


def test_a_job_waiting_longer_than_the_consumer_timeout_runs_once(
    short_timeout_fleet: LocalFleet,
) -> None:
    # One slot, ~1.2 s a job: the last of six waits ~6 s for its slot, past the 4 s timeout.
    jobs = [
        infer.delay(model=MODEL, prompt=f"wait {i}", options={"num_predict": 12}, cache=False)
        for i in range(6)
    ]
    results = [j.get(timeout=60) for j in jobs]
    assert max(r.routing.wait_s for r in results) > BROKER_TIMEOUT_S
    assert short_timeout_fleet.sim_stats("ct-a")["requests_total"] == 6, "a job ran twice"
    for name, child in short_timeout_fleet.procs.items():
        log = child.log.read_text(errors="replace")
        assert "PRECONDITION_FAILED" not in log and child.alive(), f"{name} lost its channel"
