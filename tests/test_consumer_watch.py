"""A worker whose queue consumer the broker cancelled, without Celery hearing of it, consumes
again (``app.jobs.consumer_watch``).

In the multi-host bed this happened when an instance worker reconnected just as the node of its
classic queue stopped: Celery swallowed the broker's ``basic.cancel`` and the worker idled with
jobs in its queue. The timing cannot be forced on one node, so this test makes the worker's
processes miss every cancel (a ``sitecustomize`` on their path), then deletes the instance's
queue, which makes RabbitMQ cancel the consumer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from amqp.exceptions import ChannelError

from app.bench.harness import free_port, own_fleet, results_of, wait_until
from app.celery_app import celery_app
from app.queues import instance_queue
from tasks import infer

pytestmark = pytest.mark.fleet

CHAT = "llama3.2:3b"

#: Loaded by every process of the test's fleet: a basic.cancel drops the consumer's tag, as
#: py-amqp does, and raises nothing, as when Celery swallows the ``ConsumerCancelled``.
MISSED_CANCEL = """
from amqp.channel import Channel

def _missed(self, consumer_tag):
    self._remove_tag(consumer_tag)

Channel._on_basic_cancel = _missed
"""


def consumers(queue: str) -> int:
    """The queue's consumers on the broker; 0 while it does not exist."""
    with celery_app.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).consumer_count)
        except ChannelError:
            return 0


def test_a_cancelled_consumer_celery_missed_comes_back_and_jobs_run(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(MISSED_CANCEL)
    sims = [
        {
            "name": "watch-a",
            "port": free_port(),
            "num_parallel": 2,
            "preloaded": [CHAT],
            "models": [{"name": CHAT, "kind": "chat", "default_num_predict": 4}],
        }
    ]
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    with own_fleet(tmp_path, sims, CORRAL_NAMESPACE=f"cw{os.getpid()}", PYTHONPATH=path):
        queue = instance_queue("watch-a")
        assert (
            len(results_of([infer.delay(model=CHAT, prompt=f"a {i}") for i in range(4)], 60)) == 4
        )
        assert consumers(queue) == 1

        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        # The worker's consumer comes back on its own (the watch looks every 2 s).
        wait_until(lambda: consumers(queue) == 1, 20, "the instance worker consuming again")
        after = results_of([infer.delay(model=CHAT, prompt=f"b {i}") for i in range(6)], 60)
        assert {r.routing.instance for r in after} == {"watch-a"}
