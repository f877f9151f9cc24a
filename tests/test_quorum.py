"""``queue_type = "quorum"`` on this machine's single RabbitMQ node (a cluster of one).

Quorum queues are what survives a broker node's loss in a cluster (the multi-host bed); here
they are checked for what must hold on any node count: every Corral queue is declared quorum,
jobs run, and a retry's countdown goes through Celery's native delayed delivery and comes back
(a retry dropped by the delayed-delivery exchanges would be a lost job).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.bench.harness import free_port, own_fleet, results_of
from app.queues import instance_queue, route_queue
from tasks import infer

pytestmark = [
    pytest.mark.fleet,
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl"),
]

CHAT = "llama3.2:3b"


def queue_types(prefix: str) -> dict[str, str]:
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "type"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = (line.split("\t") for line in listed.splitlines() if line.startswith(prefix))
    return {name: kind.strip() for name, kind in rows}


def test_quorum_queues_carry_jobs_and_retries(tmp_path: Path) -> None:
    sims = [
        {
            "name": name,
            "port": free_port(),
            "num_parallel": 2,
            "preloaded": [CHAT],
            "models": [{"name": CHAT, "kind": "chat", "default_num_predict": 6}],
        }
        for name in ("quo-a", "quo-b")
    ]
    namespace = f"quo{os.getpid()}"
    with own_fleet(tmp_path, sims, CORRAL_NAMESPACE=namespace, CORRAL_QUEUE_TYPE="quorum") as fleet:
        results = results_of([infer.delay(model=CHAT, prompt=f"q {i}") for i in range(12)], 60)
        assert len({r.id for r in results}) == 12

        # Every call to quo-a fails: its jobs are retried (a countdown of at least a second,
        # through the delayed-delivery exchanges) and end on quo-b.
        fleet.faults("quo-a", error_rate=1.0)
        results = results_of([infer.delay(model=CHAT, prompt=f"r {i}") for i in range(12)], 90)
        retried = [r for r in results if "quo-a" in r.routing.excluded]
        assert retried, "no job was routed to the failing instance"
        assert all(r.routing.instance == "quo-b" and r.routing.attempts == 2 for r in retried)

        kinds = queue_types(namespace)
        # Celery's own control queues (pidbox) are exclusive to a process: not Corral's.
        jobs_queues = {q: k for q, k in kinds.items() if not q.endswith(".pidbox")}
        assert {route_queue(CHAT, "normal"), instance_queue("quo-a")} <= set(jobs_queues)
        assert set(jobs_queues.values()) == {"quorum"}, jobs_queues
