"""Fixtures for the operations tests: the metrics exporter, Flower, RabbitMQ's management API.

Each process is started with the production command line as a subprocess of its own session,
under the test session's namespace (set by ``tests/conftest.py``), and stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.bench.harness import free_port, wait_until
from app.bench.stack import FLOWER_CONFIG, Child

MANAGEMENT_URL = "http://127.0.0.1:15672/api/"


def answers(url: str, **kwargs: object) -> bool:
    try:
        return requests.get(url, timeout=2, **kwargs).status_code < 500
    except requests.RequestException:
        return False


@pytest.fixture(scope="session")
def rabbitmq_management() -> str:
    """RabbitMQ's management API, enabled the way scripts/bootstrap.sh does if it is off."""
    if not answers(MANAGEMENT_URL + "overview"):
        if not shutil.which("rabbitmq-plugins"):
            pytest.skip("RabbitMQ's management API is off and rabbitmq-plugins is not here")
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        wait_until(lambda: answers(MANAGEMENT_URL + "overview"), 60, "the management API")
    return MANAGEMENT_URL


@dataclass
class Samples:
    """One scrape of a Prometheus endpoint, parsed by prometheus-client."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 if absent (a counter not yet incremented)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples whose labels include these."""
        wanted = set(labels.items())
        return sum(v for (n, lbl), v in self.values.items() if n == name and wanted <= lbl)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.values)


@dataclass
class MetricsEndpoint:
    url: str

    def scrape(self) -> Samples:
        response = requests.get(self.url, timeout=10)
        response.raise_for_status()
        return Samples(
            {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(response.text)
                for s in family.samples
            }
        )

    def wait_for(self, check: Callable[[Samples], bool], what: str, timeout: float = 15) -> Samples:
        """Scrape until ``check`` holds: a job's outcome is recorded just after .get() returns."""
        return wait_until(
            lambda: s if check(s := self.scrape()) else None, timeout, what, every=0.2
        )


@contextmanager
def _serving(child: Child, url: str) -> Iterator[str]:
    """Start ``child``, wait (bounded) until ``url`` answers, stop it by PID afterwards."""
    child.start()
    try:
        wait_until(
            lambda: child.alive() and answers(url),
            30,
            f"{child.name} on {url} (log: {child.log})",
            every=0.25,
        )
        yield url
    finally:
        child.stop()


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsEndpoint]:
    """``corral metrics`` as the CLI runs it, on a free port."""
    port = free_port()
    child = Child(
        "metrics",
        [sys.executable, "-m", "app.cli", "metrics", "--host", "127.0.0.1", "--port", str(port)],
        dict(os.environ),
        log_dir=tmp_path_factory.mktemp("metrics"),
    )
    with _serving(child, f"http://127.0.0.1:{port}/metrics") as url:
        yield MetricsEndpoint(url)


@dataclass
class FlowerServer:
    url: str
    auth: tuple[str, str]

    def api(self, path: str, **params: object) -> requests.Response:
        return requests.get(self.url + path, params=params, auth=self.auth, timeout=10)


@pytest.fixture(scope="module")
def flower(
    rabbitmq_management: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerServer]:
    """Flower with Corral's config, basic auth and a database of its own, on a free port."""
    workdir = tmp_path_factory.mktemp("flower")
    port = free_port()
    auth = ("ops", "s3cret-flower")
    env = {
        **os.environ,
        "FLOWER_BASIC_AUTH": ":".join(auth),
        "FLOWER_DB": str(workdir / "flower.db"),
    }
    argv = [sys.executable, "-m", "app.cli", "flower"]  # as corral up starts it
    child = Child("flower", [*argv, f"--conf={FLOWER_CONFIG}", f"--port={port}"], env, workdir)
    with _serving(child, f"http://127.0.0.1:{port}/healthcheck") as url:
        yield FlowerServer(url.removesuffix("/healthcheck"), auth)
