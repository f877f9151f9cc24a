"""Fixtures that run real simulators on free ports in a background thread.

Every wait is bounded: fleet start/stop, HTTP calls (explicit timeouts) and polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import ollama
import pytest

from app.simulator import FleetThread, SimInstance, SimModel

HTTP_TIMEOUT = 10.0


def fast_models() -> list[SimModel]:
    """Models quick enough for tests: ~10 ms loads, 24 tokens in about 50 ms."""
    return [
        SimModel(name="llama3.2:3b", load_seconds=0.01, tokens_per_second=500),
        SimModel(name="qwen2.5:7b", load_seconds=0.01, tokens_per_second=500),
        SimModel(name="nomic-embed-text", kind="embed", load_seconds=0.01, embedding_length=768),
    ]


@dataclass
class Sim:
    """A running simulator plus clients for it; HTTP clients are reused because building
    one (SSL context included) costs tens of milliseconds."""

    url: str
    instance: SimInstance
    http: httpx.Client = field(init=False)
    _clients: dict[float, ollama.Client] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT)

    def client(self, timeout: float = HTTP_TIMEOUT) -> ollama.Client:
        """The official client with this timeout; closed when the test's simulator stops."""
        if timeout not in self._clients:
            self._clients[timeout] = ollama.Client(host=self.url, timeout=timeout)
        return self._clients[timeout]

    def close(self) -> None:
        self.http.close()
        for client in self._clients.values():
            client.close()

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def stats(self) -> dict[str, Any]:
        reply = self.get("/sim/stats")
        reply.raise_for_status()
        return reply.json()

    def loaded(self) -> list[str]:
        return [m.model for m in self.client().ps().models]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s: {self.stats()}")
            time.sleep(0.02)


@pytest.fixture
def start_sim() -> Iterator[Callable[..., Sim]]:
    """Factory: ``start_sim(num_parallel=1, ...)`` starts one simulator for this test."""
    started: list[tuple[Sim, FleetThread]] = []

    def start(**settings: Any) -> Sim:
        settings.setdefault("models", fast_models())
        instance = SimInstance(name="test", port=0, **settings)
        fleet = FleetThread([instance]).start(timeout=10)
        sim = Sim(fleet.url(), instance)
        started.append((sim, fleet))
        return sim

    yield start
    for sim, fleet in started:
        sim.close()
        fleet.stop(timeout=10)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    """One simulator shared by a module's read-mostly tests."""
    instance = SimInstance(name="shared", port=0, models=fast_models(), preloaded=["llama3.2:3b"])
    with FleetThread([instance]) as fleet:
        sim = Sim(fleet.url(), instance)
        yield sim
        sim.close()


def _concurrently(calls: list[Callable[[], Any]], timeout: float = 15.0) -> list[Any]:
    """Run ``calls`` in parallel threads; results (or raised exceptions) in order.

    Each call must carry its own HTTP timeout, which bounds the executor's final join.
    """
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=timeout))
            except Exception as exc:  # the caller asserts on the mix of outcomes
                results.append(exc)
        return results


@pytest.fixture
def concurrently() -> Callable[..., list[Any]]:
    return _concurrently
