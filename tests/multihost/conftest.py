"""The multi-host bed (``bed.py``): its hosts built once for the module, Corral's processes once
per test class."""

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


#: Where the logs of the last bed that saw a test fail are kept (its workdir is deleted).
LOGS_KEPT = Path(tempfile.gettempdir()) / "corral-bed-logs"


@pytest.fixture(scope="module")
def hosts(request: pytest.FixtureRequest) -> Iterator[Bed]:
    """The bed's hosts (network, RabbitMQ cluster, Redis and Sentinels), once for the module:
    torn down after it, so its nodes do not idle through the rest of the suite."""
    why = can_run()
    if why:
        pytest.skip(why)
    teardown()  # what a crashed earlier run may have left
    # Not under pytest's own directory: it is root's alone, and the RabbitMQ nodes run as the
    # rabbitmq user.
    workdir = Path(tempfile.mkdtemp(prefix="corral-bed-"))
    os.chmod(workdir, 0o755)
    bed = Bed(workdir)
    bed.start_hosts()
    failed_before = request.session.testsfailed
    try:
        yield bed
    finally:
        bed.stop()
        if request.session.testsfailed > failed_before or os.environ.get(KEEP_LOGS):
            shutil.rmtree(LOGS_KEPT, ignore_errors=True)
            shutil.copytree(workdir, LOGS_KEPT, ignore=shutil.ignore_patterns("mnesia"))
            print(f"\nthe bed's logs: {LOGS_KEPT}")
        shutil.rmtree(workdir, ignore_errors=True)


# One per test class (pytest-randomly keeps a class's tests together), on the same hosts: the
# RabbitMQ nodes take 15-20 s each to start, and a class's Corral processes only a few.
@pytest.fixture(scope="class")
def bed(hosts: Bed) -> Iterator[Bed]:
    """Corral on the bed with quorum queues, replicated across the three nodes."""
    yield from _corral(hosts, "quorum")


@pytest.fixture(scope="class")
def classic_bed(hosts: Bed) -> Iterator[Bed]:
    """Corral on the bed with classic queues: each lives on the node that declared it."""
    yield from _corral(hosts, "classic")


def _corral(bed: Bed, queue_type: str) -> Iterator[Bed]:
    bed.start_corral(f"mh{os.getpid()}{queue_type[0]}", queue_type)
    env = {k: v for k, v in bed.corral_env().items() if k.startswith("CORRAL_")}
    try:
        with settings_from(env):
            wait_until(bed.ready, 120, "workers and routers of the bed", every=0.5)
            yield bed
    finally:
        bed.stop_corral()
