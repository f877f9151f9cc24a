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


# One module uses it: torn down after it, so its nodes do not idle through the rest of the suite.
@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    why = can_run()
    if why:
        pytest.skip(why)
    teardown()  # what a crashed earlier run may have left
    # Not under pytest's own directory: it is root's alone, and the RabbitMQ nodes run as the
    # rabbitmq user.
    workdir = Path(tempfile.mkdtemp(prefix="corral-bed-"))
    os.chmod(workdir, 0o755)
    stack = Bed(workdir, namespace=f"mh{os.getpid()}")
    stack.start()
    env = {k: v for k, v in stack.corral_env().items() if k.startswith("CORRAL_")}
    try:
        with settings_from(env):
            wait_until(stack.ready, 120, "workers and routers of the bed", every=0.5)
            yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
