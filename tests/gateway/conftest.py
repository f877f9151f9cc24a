"""The gateway as a subprocess in front of the session's fleet.

The gateway runs with the production CLI (``python -m app.cli gateway``) and the test
session's environment (its namespace), keys in a SQLite file of its own. Every process is
stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from app.bench.harness import LocalFleet, free_port, wait_until
from app.bench.stack import Child

#: Small enough that a test can exceed it cheaply.
MAX_BODY = 64 * 1024


@dataclass
class Gateway:
    url: str
    key: str  # agent "tester": every tier, default normal
    batch_key: str  # agent "etl": batch only
    log: Path
    db_url: str
    child: Child

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def log_text(self, since: int = 0) -> str:
        """The gateway's log, from character ``since`` on."""
        return self.log.read_text(errors="replace")[since:]


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def start_gateway(workdir: Path, name: str, **env: str) -> tuple[Child, str]:
    """A gateway subprocess on a free port, once it answers ``GET /``."""
    port = free_port()
    child = Child(
        name,
        [sys.executable, "-m", "app.cli", "gateway", "--port", str(port), "--log-level", "info"],
        dict(os.environ, **env),
        log_dir=workdir,
    )
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url + "/") or not child.alive(), 30, f"gateway {name}")
    except TimeoutError:
        child.stop()
        raise
    if not child.alive():
        raise RuntimeError(f"gateway {name} exited at start:\n{child.log.read_text()}")
    return child, url


@pytest.fixture(scope="session")
def gateway(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from app.gateway.api_keys import KeyStore

    workdir = tmp_path_factory.mktemp("gateway")
    db_url = f"sqlite:///{workdir}/corral.db"
    store = KeyStore.ready(db_url)
    key, _ = store.add("tester", "test-suite", "interactive,normal,batch", "normal")
    batch_key, _ = store.add("etl", "batch-etl", "batch")
    child, url = start_gateway(
        workdir,
        "gateway",
        CORRAL_DATABASE_URL=db_url,
        CORRAL_GATEWAY_MAX_BODY_BYTES=str(MAX_BODY),
        CORRAL_GATEWAY_KEY_CACHE_TTL="0.5",
    )
    try:
        yield Gateway(url, key, batch_key, child.log, db_url, child)
    finally:
        child.stop()
