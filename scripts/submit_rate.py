"""The client alone: jobs published per second from one thread, with nothing consuming them.

``corral bench --scenario submit`` measures the same with the fleet up, whose routers take
the jobs meanwhile on the same machine. Here one instance is configured (its model is
served) but no worker or router runs: the jobs stay in their queue, which is purged after,
with the namespace's Redis keys. ``infer.delay`` one by one, then ``infer.submit_many``
with all of them, alternately, ``ROUNDS`` times; every job has an agent (fairness counts it).

    .venv/bin/python scripts/submit_rate.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

MODEL = "bench:latest"
ROUNDS = 3
os.environ.update(
    CORRAL_NAMESPACE=f"submitrate{os.getpid()}",
    CORRAL_CONFIG="/nonexistent/corral.toml",
    CORRAL_DATABASE_URL=f"sqlite:///{tempfile.mkdtemp()}/corral.db",
    CORRAL_INSTANCES=json.dumps(
        [{"name": "idle", "url": "http://127.0.0.1:9", "parallelism": 2, "models": [MODEL]}]
    ),
)


def main(n: int) -> None:
    from app.celery_app import celery_app
    from app.queues import route_queue
    from app.state.fleet import fleet_state
    from tasks import infer

    def fields(method: str, k: int) -> list[dict[str, str]]:
        return [
            {"model": MODEL, "prompt": f"{method} {k}.{i}", "tier": "batch", "agent": "rate"}
            for i in range(n)
        ]

    rates: dict[str, list[float]] = {"infer.delay": [], "infer.submit_many": []}
    cpu: dict[str, list[float]] = {"infer.delay": [], "infer.submit_many": []}
    try:
        infer.delay(**fields("warm", 0)[0])  # connections, scripts, queue declared
        for k in range(ROUNDS):
            for method in rates:
                jobs = fields(method, k)
                wall, used = time.perf_counter(), time.process_time()
                if method == "infer.delay":
                    for job in jobs:
                        infer.delay(**job)
                else:
                    infer.submit_many(jobs)
                rates[method].append(n / (time.perf_counter() - wall))
                cpu[method].append((time.process_time() - used) * 1000 / n)
    finally:
        with celery_app.connection_for_write() as conn:
            channel = conn.channel()
            channel.queue_delete(route_queue(MODEL, "batch"))
            channel.close()
        fleet_state().clear()
    for method in rates:
        print(
            f"{method:18} median {statistics.median(rates[method]):7.1f} jobs/s, rounds"
            f" {[round(r) for r in rates[method]]}, CPU {statistics.median(cpu[method]):.2f} ms"
            " a job"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
