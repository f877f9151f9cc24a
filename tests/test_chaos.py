"""Things break while jobs are queued and running; every job still gets exactly one result.

These restart shared services of the machine (RabbitMQ, Redis), so they run after every
other test (tests/conftest.py sorts them last); `pytest -m "not chaos"` leaves them out.
Each waits generously (minutes) for the fleet to reconnect: consumers notice a dead broker
connection by heartbeat, up to tens of seconds late.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from redis import RedisError

from app.bench.harness import LocalFleet, wait_until
from app.ops.backing_services import _reachable
from app.schemas import InferResult
from app.settings import get_settings
from tasks import infer

pytestmark = [pytest.mark.fleet, pytest.mark.chaos]

CHAT = "llama3.2:3b"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
def test_broker_restart_with_jobs_queued_and_running_loses_nothing(
    healthy_fleet: LocalFleet,
) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)  # ~0.4 s a job: a backlog of seconds
    jobs = [
        infer.delay(model=CHAT, prompt=f"chaos {i}", tier=("batch", "interactive")[i % 2])
        for i in range(40)
    ]
    wait_until(lambda: healthy_fleet.sim_stats("sim-a")["in_flight"] > 0, 20, "jobs running")
    _rabbitmqctl("stop_app")
    time.sleep(3)
    _rabbitmqctl("start_app")
    wait_until(lambda: _reachable(get_settings().broker_url, 5672), 60, "RabbitMQ back")
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    results = [j.get(timeout=180) for j in jobs]
    assert [r.id for r in results] == [j.id for j in jobs]
    assert all(r.text for r in results)
    for name in healthy_fleet.sim_urls:
        assert healthy_fleet.sim_stats(name)["peak_in_flight"] <= 2, name
    wait_until(healthy_fleet.ready, 60, "workers and routers reconnected")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_restart_with_jobs_queued_loses_no_job(healthy_fleet: LocalFleet) -> None:
    """Redis restarts empty (this machine keeps nothing on disk): slots, waiters, registry
    and the results stored before are gone. Every job not finished before it still ends with
    exactly one result. (The instances hang meanwhile, so none finishes during the restart.)"""
    from app.ops.backing_services import ensure_services

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)  # ~0.4 s a job: a backlog of seconds
    jobs = [infer.delay(model=CHAT, prompt=f"redis {i}", cache=False) for i in range(30)]
    wait_until(lambda: healthy_fleet.sim_stats("sim-a")["in_flight"] > 0, 20, "jobs running")
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, hang=True)
    time.sleep(1.5)  # the jobs generating now finish; the next ones hang at their start
    finished = {j.id for j in jobs if j.ready()}
    subprocess.run(["redis-cli", "shutdown", "nosave"], check=False, timeout=30)
    wait_until(lambda: not _reachable(get_settings().redis_url, 6379), 20, "Redis down")
    time.sleep(2)
    assert ensure_services() == []
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, hang=False, slow_factor=1.0)
    pending = [j for j in jobs if j.id not in finished]
    done: dict[str, str] = {}
    deadline = time.monotonic() + 180
    while len(done) < len(pending) and time.monotonic() < deadline:
        for job in pending:
            if job.id not in done:
                try:
                    if job.ready():
                        done[job.id] = InferResult.model_validate(job.result).text
                except (RedisError, OSError):
                    pass  # this process's own Redis connections come back on their own
        time.sleep(0.5)
    assert len(done) == len(pending), f"{len(pending) - len(done)} jobs without a result"
    assert all(done.values()) and len(pending) > 10
    for name in healthy_fleet.sim_urls:
        assert healthy_fleet.sim_stats(name)["peak_in_flight"] <= 2, name
