"""The bed with classic queues (``queue_type = "classic"``, the default): a classic queue lives
on one node of the cluster, the node that declared it, and nothing replicates it.

So losing that node stops its queues until the node is back. What this costs, measured here:
jobs in those queues wait, none is lost (durable queues, persistent messages), and they run
once the node is back; a job submitted meanwhile to a queue on the stopped node is refused at
the call (``BrokerUnavailable``) or waits in it. Quorum queues (``test_bed.py``) keep serving.
"""

from __future__ import annotations

import time
from typing import Any

from app.bench.harness import wait_until
from app.errors import BrokerUnavailable
from tasks import infer
from tests.multihost.bed import CHAT, Bed


def test_classic_queues_serve_across_hosts(classic_bed: Bed) -> None:
    before = classic_bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"classic {i}", cache=False) for i in range(20)]
    classic_bed.expect_each_once(jobs, before, "classic, no fault")


def test_the_node_holding_classic_queues_stopped_they_wait_and_lose_nothing(
    classic_bed: Bed,
) -> None:
    bed = classic_bed
    before = bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"classic node {i}", cache=False) for i in range(40)]
    wait_until(lambda: sum(j.ready() for j in jobs) >= 4, 30, "the first results")
    home = bed.queue_home(CHAT)
    bed.rabbitmqctl(home, "stop_app")
    refused: list[str] = []
    late: list[Any] = []
    try:
        stopped = time.monotonic()
        for i in range(6):
            try:
                late.append(infer.delay(model=CHAT, prompt=f"node down {i}", cache=False))
            except BrokerUnavailable as exc:
                refused.append(str(exc))
        waited = sum(j.ready() for j in jobs)
        time.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
    finally:
        bed.rabbitmqctl(home, "start_app")
    back = time.monotonic()
    print(
        f"classic queues' node {home.name} stopped for 15 s: {waited} of 40 jobs ended by then;"
        f" of 6 submitted meanwhile, {len(late)} queued, {len(refused)} refused"
        + (f" ({refused[0][:120]})" if refused else "")
    )
    bed.expect_each_once(jobs + late, before, f"classic, {home.name} back", timeout=180)
    print(f"  the last job ended {time.monotonic() - back:.0f} s after the node was back")
