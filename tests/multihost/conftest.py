"""The multi-host bed (``bed.py``), built once for its tests: RabbitMQ nodes take 15-20 s each
to start."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench.harness import settings_from, wait_until
from tests.multihost.bed import Bed, can_run, teardown


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "multihost" in str(item.fspath):
            item.add_marker(pytest.mark.multihost)


#: Set (to anything) to keep the bed's logs also when every test passed.
KEEP_LOGS = "CORRAL_BED_KEEP_LOGS"


#: Where the logs of the last bed that saw a test fail are kept, a folder per queue type
#: (its workdir is deleted).
LOGS_KEPT = Path(tempfile.gettempdir()) / "corral-bed-logs"


# Each module uses one: torn down after it, so its nodes do not idle through the rest of the
# suite (and two beds never run at once: they share the namespaces' names).
@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    """The bed with quorum queues, replicated across the three nodes."""
    yield from _bed(request, "quorum")


@pytest.fixture(scope="module")
def classic_bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    """The bed with classic queues: each lives on the node that declared it."""
    yield from _bed(request, "classic")


def _bed(request: pytest.FixtureRequest, queue_type: str) -> Iterator[Bed]:
    why = can_run()
    if why:
        pytest.skip(why)
    teardown()  # what a crashed earlier run may have left
    # Not under pytest's own directory: it is root's alone, and the RabbitMQ nodes run as the
    # rabbitmq user.
    workdir = Path(tempfile.mkdtemp(prefix="corral-bed-"))
    os.chmod(workdir, 0o755)
    stack = Bed(workdir, namespace=f"mh{os.getpid()}{queue_type[0]}", queue_type=queue_type)
    stack.start()
    env = {k: v for k, v in stack.corral_env().items() if k.startswith("CORRAL_")}
    failed_before = request.session.testsfailed
    try:
        with settings_from(env):
            wait_until(stack.ready, 120, "workers and routers of the bed", every=0.5)
            yield stack
    finally:
        stack.stop()
        if request.session.testsfailed > failed_before or os.environ.get(KEEP_LOGS):
            kept = LOGS_KEPT / queue_type
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("mnesia"))
            print(f"\nthe bed's logs: {kept}")
        shutil.rmtree(workdir, ignore_errors=True)
