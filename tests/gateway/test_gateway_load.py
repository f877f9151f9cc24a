"""Many waiting requests at once, and clients that leave while their job waits."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest

from app.bench.harness import LocalFleet, wait_until
from app.queues import queue_counts, route_queue
from app.settings import TIERS
from app.state.fleet import fleet_state
from tasks import infer
from tests.gateway.conftest import Gateway

MODEL = "llama3.2:3b"


def test_120_concurrent_waiting_requests_and_a_free_event_loop(
    gateway: Gateway, healthy_fleet: LocalFleet
) -> None:
    # Slower instances: 6 slots, ~0.2 s a job, so 120 jobs keep requests waiting ~4 s.
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=10.0)

    done, waiting = [0], []

    async def run() -> tuple[list[httpx.Response], list[float]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=gateway.url, headers=gateway.auth(), timeout=60, limits=limits
        ) as client:

            async def generate(i: int) -> httpx.Response:
                body = {"model": MODEL, "prompt": f"load {i}", "stream": False}
                reply = await client.post("/api/generate", json=body)
                done[0] += 1
                return reply

            async def chat(i: int) -> httpx.Response:
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"c{i}"}]}
                async with client.stream("POST", "/api/chat", json=body) as reply:
                    await reply.aread()
                done[0] += 1
                return reply

            async def probe() -> list[float]:
                # Once the burst is in, every request waits on its job: the event loop must
                # stay free, so the health check answers at once. Not before: while the 120
                # requests are still being published (over 1 s on a busy 2-core machine), the
                # publishing threads share the gateway's GIL with its loop.
                await asyncio.to_thread(wait_until, _burst_in(done), 30, "the burst is in")
                delays = []
                for _ in range(10):
                    started = time.monotonic()
                    assert (await client.get("/")).status_code == 200
                    delays.append(time.monotonic() - started)
                    waiting.append(120 - done[0])
                    await asyncio.sleep(0.2)
                return delays

            waits = [generate(i) for i in range(80)] + [chat(i) for i in range(40)]
            *replies, delays = await asyncio.gather(*waits, probe())
            return replies, delays

    replies, delays = asyncio.run(run())
    failed = [r.text for r in replies if r.status_code != 200]
    assert not failed, failed[:3]
    assert all(b'"done":true' in r.content for r in replies)
    assert waiting[0] >= 80, waiting  # the probes ran while most of the burst waited
    assert max(delays) < 0.25, delays


def _burst_in(done: list[int], burst: int = 120, in_transit: int = 3) -> Callable[[], bool]:
    """Whether the burst's jobs are all published: each one queued for a router, waiting for
    a slot, holding one, or done (a few may be between two of these at the reading)."""

    def check() -> bool:
        fleet = fleet_state()
        queued = queue_counts([route_queue(MODEL, tier) for tier in TIERS])
        held = sum(i.in_flight for i in fleet.instances.snapshot().instances)
        seen = sum(r for r, _ in queued.values()) + fleet.slots.waiting(MODEL) + held + done[0]
        return seen >= burst - in_transit

    return check


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_a_queued_job_revokes_it(
    gateway: Gateway, healthy_fleet: LocalFleet, stream: bool
) -> None:
    """Slots full, router threads full: the job is a message in RabbitMQ when its client
    leaves, so the gateway revokes it and it never runs."""
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=40.0)
    headers = gateway.auth()
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as http:
        body = {"model": MODEL, "prompt": "slow", "tier": "batch"}
        # 6 running, 16 held by the batch router's threads, 30 queued: ~4 s of backlog.
        blockers = [http.post("/jobs", json=body).json()["id"] for _ in range(6 + 16 + 30)]
        before = len(gateway.log_text())
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gateway.url + "/api/generate",
                json={"model": MODEL, "prompt": "leaving", "stream": stream},
                headers=headers | {"X-Corral-Tier": "batch"},
                timeout=httpx.Timeout(30, read=1.0),
            )
        left = wait_until(
            lambda: re.findall(r"client left while job (\S+) waited", gateway.log_text(before)),
            10,
            "the gateway to notice the client left",
        )[0]
        wait_until(lambda: f"job {left}: revoked" in gateway.log_text(), 10, "the revoke")
        for name in healthy_fleet.sim_urls:
            healthy_fleet.faults(name, slow_factor=1.0)
        for job in blockers:
            wait_until(
                lambda j=job: http.get(f"/jobs/{j}").json()["state"] == "succeeded",
                60,
                "the backlog to drain",
            )
    assert infer.AsyncResult(left).state in ("REVOKED", "PENDING")  # never SUCCESS: never ran


@pytest.mark.load
def test_1000_streaming_clients_at_once_all_complete(
    gateway: Gateway, healthy_fleet: LocalFleet, load_report: dict[str, Any]
) -> None:
    """Half on Ollama's API (NDJSON), half on OpenAI's (SSE): every stream ends with its
    final line, no 5xx, and the gateway's threads and memory stay bounded."""
    clients = 1000
    assert gateway.child.proc is not None
    gw = psutil.Process(gateway.child.proc.pid)
    before = gw.memory_info().rss
    usage = _Sampler(gw)

    async def ollama(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"stream {i}"}]}
        async with client.stream("POST", "/api/chat", json=body) as reply:
            if reply.status_code != 200:
                return f"status {reply.status_code}: {(await reply.aread())[:200]!r}"
            lines = [line async for line in reply.aiter_lines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        return "ok" if last.get("done") is True else f"no final line: {lines[-1:]}"

    async def openai(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"sse {i}"}],
            "stream": True,
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                return f"status {reply.status_code}: {(await reply.aread())[:200]!r}"
            events = [line async for line in reply.aiter_lines() if line.startswith("data:")]
        return "ok" if events and events[-1] == "data: [DONE]" else f"no [DONE]: {events[-1:]}"

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        timeout = httpx.Timeout(240, connect=60)
        async with httpx.AsyncClient(
            base_url=gateway.url, headers=gateway.auth(), timeout=timeout, limits=limits
        ) as client:
            calls = [(ollama if i % 2 else openai)(client, i) for i in range(clients)]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), timeout=300
            )
        return [o if isinstance(o, str) else f"{type(o).__name__}: {o}" for o in outcomes]

    started = time.monotonic()
    with usage:
        outcomes = asyncio.run(run())
    elapsed = time.monotonic() - started
    tally = Counter(o if o == "ok" else o[:60] for o in outcomes)
    load_report["1000 streams"] = {
        "elapsed_s": round(elapsed, 1),
        "outcomes": dict(tally),
        "gateway_rss_mb": {
            "before": round(before / 2**20),
            "peak": round(usage.peak_rss / 2**20),
            "after": round(gw.memory_info().rss / 2**20),
        },
        "gateway_threads_peak": usage.peak_threads,
    }
    assert tally["ok"] == clients, tally.most_common(5)
    # Threads: uvicorn's loop plus the bounded pool (gateway_threads, 64), not one per client.
    assert usage.peak_threads <= 64 + 40, usage.peak_threads
    assert usage.peak_rss - before < 400 * 2**20, load_report["1000 streams"]


class _Sampler:
    """Peak RSS and thread count of a process, sampled every 0.2 s while in the block."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.peak_rss, self.peak_threads = proc, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            self.peak_threads = max(self.peak_threads, self.proc.num_threads())

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
