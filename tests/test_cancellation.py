"""Cancelling jobs with Celery's own ``AsyncResult.revoke()``: running, and waiting for a slot.

Real processes (the session fleet): the simulators record when a client closed a request
mid-generation, so "the generation stopped" is what the server saw, not what Corral says.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import pytest
from celery.exceptions import TaskRevokedError

from app.bench.harness import LocalFleet, depth, wait_until
from app.gateway.jobs import place
from app.jobs import cancellation
from app.queues import dead_letter_queue
from app.state import keys
from app.state.fleet import fleet_state
from tasks import infer

pytestmark = pytest.mark.fleet

CHAT = "llama3.2:3b"
#: 400 tokens/s on the session's simulators: about 5 s of generation, far past the test.
LONG = {"num_predict": 2000}


def test_revoking_a_running_job_closes_its_call(healthy_fleet: LocalFleet) -> None:
    dead_before = depth(dead_letter_queue())
    job = infer.delay(model=CHAT, prompt="a long story", options=LONG, cache=False)
    wait_until(lambda: place(job.id, CHAT) == "running", 10, "the job to start")
    wait_until(lambda: healthy_fleet.sim_total("active") == 1, 10, "the server to generate")
    time.sleep(0.5)  # well into its generation
    instance = fleet_state().slots.holder(job.id)

    revoked_at = time.time()
    job.revoke()
    wait_until(lambda: healthy_fleet.sim_total("cancelled_total") == 1, 5, "the server to see it")
    stopped_after = max(
        healthy_fleet.sim_stats(n)["last_cancelled_at"] for n in healthy_fleet.sim_urls
    )
    print(f"\nrevoke() to the server's generation stopping: {stopped_after - revoked_at:.3f} s")
    assert stopped_after - revoked_at < 0.5, f"generation stopped {stopped_after - revoked_at}s"
    assert healthy_fleet.sim_total("active") == 0

    with pytest.raises(TaskRevokedError):
        job.get(timeout=10)
    assert job.state == "REVOKED"
    wait_until(lambda: healthy_fleet.idle(), 5, "its slot to be freed")
    time.sleep(0.5)  # a retry or a dead letter would have been published by now
    assert depth(dead_letter_queue()) == dead_before
    assert healthy_fleet.sim_total("requests_total") == 1  # not retried anywhere
    row = fleet_state().redis.hgetall(keys.instance(fleet_state().ns, instance))
    assert row["breaker"] == "closed" and int(row.get("consecutive", 0)) == 0
    assert int(row["cancelled"]) >= 1  # counted as cancelled, not as a failure

    # The freed slot is handed on: the next job runs at once.
    assert infer.delay(model=CHAT, prompt="next", cache=False).get(timeout=10).text


def test_revoking_a_job_waiting_for_a_slot_means_it_never_runs(
    healthy_fleet: LocalFleet,
) -> None:
    # Every slot busy with a long generation; the target waits in a router thread.
    blockers = [
        infer.delay(model=CHAT, prompt=f"blocker {i}", options=LONG, cache=False) for i in range(6)
    ]
    wait_until(lambda: healthy_fleet.sim_total("active") == 6, 15, "every slot to be busy")
    target = infer.delay(model=CHAT, prompt="never", cache=False, tier="interactive")
    wait_until(lambda: place(target.id, CHAT) == "waiting_for_slot", 10, "the target to wait")

    target.revoke()
    wait_until(lambda: place(target.id, CHAT) == "queued", 3, "the target to stop waiting")
    with pytest.raises(TaskRevokedError):
        target.get(timeout=5)
    assert target.state == "REVOKED"

    started = time.monotonic()
    for job in blockers:
        job.revoke()
    for job in blockers:
        with pytest.raises(TaskRevokedError):
            job.get(timeout=10)
    wait_until(lambda: healthy_fleet.idle(), 5, "every slot to be freed")
    assert time.monotonic() - started < 3  # not the 5 s their generations would take
    time.sleep(0.5)
    assert healthy_fleet.sim_total("requests_total") == 6  # the target never reached a server
    assert healthy_fleet.sim_total("cancelled_total") == 6


def test_many_threads_revoking_at_once_never_deadlock() -> None:
    """A gateway whose clients leave together revokes from many threads at once. Celery's
    ``control.revoke`` holds a pooled broker connection while it takes a producer, which may
    take a second pooled connection: with more revoking threads than ``broker_pool_limit``
    (10), every thread held one connection and waited for another, for ever, and so did every
    publish after them (the gateway stopped answering). Found by the 1,000-stream load test."""
    jobs: queue.Queue[str] = queue.Queue()
    for _ in range(256):
        jobs.put(str(uuid.uuid4()))
    revoked: list[str] = []

    def revoke_all() -> None:
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            cancellation.cancel(job)
            revoked.append(job)

    # 64 threads, as the gateway's pool has; daemons, so a deadlocked one cannot keep the
    # test process alive.
    running = [threading.Thread(target=revoke_all, daemon=True) for _ in range(64)]
    for thread in running:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert len(revoked) == 256, f"{256 - len(revoked)} of 256 revokes still waiting after 30 s"
