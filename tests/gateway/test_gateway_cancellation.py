"""Clients that leave the gateway cancel their jobs: Ollama's and OpenAI's APIs, streamed or not.

What the simulators record is the proof: a request whose client closed it mid-generation
counts in ``cancelled_total``, and ``busy_seconds`` adds up the time their slots were held,
so a generation that ran on for nobody would show there.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from app.bench.harness import LocalFleet, wait_until
from tasks import infer
from tests.gateway.conftest import Gateway

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
#: 400 tokens/s on the session's simulators, slowed a little by the other slot: ~4-5 s.
TOKENS = 1600
FULL_S = TOKENS / 400


def test_60_streams_that_leave_after_two_lines(gateway: Gateway, healthy_fleet: LocalFleet) -> None:
    clients = 60
    job_ids: list[str] = []
    read_s: list[float] = []  # how long each client read its stream: what it consumed

    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"a long story, number {i}"}],
            "options": {"num_predict": TOKENS},
        }
        async with client.stream("POST", "/api/chat", json=body) as reply:
            assert reply.status_code == 200
            job_ids.append(reply.headers["x-corral-job-id"])
            started, lines = time.monotonic(), 0
            async for _ in reply.aiter_lines():
                lines += 1
                if lines == 2:
                    break
            read_s.append(time.monotonic() - started)
        # Leaving the block without reading the rest closes the connection.

    async def run() -> None:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=gateway.url, headers=gateway.auth(), timeout=120, limits=limits
        ) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(clients)))

    started = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - started
    wait_until(
        lambda: healthy_fleet.idle() and healthy_fleet.sim_total("active") == 0,
        10,
        "every slot to be freed",
    )

    cancelled = healthy_fleet.sim_total("cancelled_total")
    busy = healthy_fleet.sim_total("busy_seconds")
    print(
        f"\n60 streams leaving after 2 lines: {elapsed:.1f} s in all, {cancelled:.0f} cancelled,"
        f" fleet busy {busy:.1f} s (run to the end: ~{clients * FULL_S:.0f} s),"
        f" clients read {sum(read_s):.1f} s"
    )
    assert cancelled >= clients - 2, cancelled  # a generation may just have ended
    assert busy < clients * FULL_S * 0.25, busy  # nowhere near 60 full generations
    assert busy < sum(read_s) + clients * 1.0  # what clients consumed, plus < 1 s each
    assert elapsed < clients * FULL_S / 6 / 2  # half the time the fleet would have needed
    states = [infer.AsyncResult(j).state for j in job_ids]
    assert states.count("REVOKED") >= clients - 2, states


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        ("/api/generate", True),
        ("/api/generate", False),
        ("/v1/completions", True),
        ("/v1/completions", False),
    ],
)
def test_a_client_that_leaves_a_running_job_cancels_it(
    gateway: Gateway, healthy_fleet: LocalFleet, path: str, stream: bool
) -> None:
    body: dict = {"model": MODEL, "prompt": f"leave {path} {stream}", "stream": stream}
    if path.startswith("/v1"):
        body["max_tokens"] = TOKENS
    else:
        body["options"] = {"num_predict": TOKENS}
    with httpx.Client(base_url=gateway.url, headers=gateway.auth(), timeout=30) as http:
        if stream:
            with http.stream("POST", path, json=body) as reply:
                assert reply.status_code == 200
                next(reply.iter_lines())
                left_at = time.time()
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(path, json=body, timeout=httpx.Timeout(30, read=1.5))
            left_at = time.time()
    wait_until(lambda: healthy_fleet.sim_total("cancelled_total") == 1, 5, "the cancellation")
    stopped = max(healthy_fleet.sim_stats(n)["last_cancelled_at"] for n in healthy_fleet.sim_urls)
    assert stopped - left_at < 1.0, stopped - left_at
    wait_until(
        lambda: healthy_fleet.idle() and healthy_fleet.sim_total("active") == 0,
        5,
        "the slot to be freed",
    )
    assert healthy_fleet.sim_total("requests_total") == 1  # not retried


def test_streams_read_to_their_end_revoke_nothing(gateway: Gateway) -> None:
    """The API's last line ends the response before the job's result is stored: that is a
    stream's end, not a client that left. (It was taken for one: a revoke per stream, 150 of
    them in a 1,000-stream burst.)"""
    before = len(gateway.log_text())

    async def run() -> list[str]:
        async with httpx.AsyncClient(
            base_url=gateway.url, headers=gateway.auth(), timeout=60
        ) as client:

            async def ollama(i: int) -> str:
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"end {i}"}]}
                async with client.stream("POST", "/api/chat", json=body) as reply:
                    return [line async for line in reply.aiter_lines() if line][-1]

            async def openai(i: int) -> str:
                body = {"model": MODEL, "prompt": f"end {i}", "stream": True, "max_tokens": 20}
                async with client.stream("POST", "/v1/completions", json=body) as reply:
                    return [line async for line in reply.aiter_lines() if line][-1]

            return await asyncio.gather(*(f(i) for i in range(20) for f in (ollama, openai)))

    last_lines = asyncio.run(run())
    assert all('"done":true' in line or line == "data: [DONE]" for line in last_lines), last_lines
    time.sleep(1.0)  # a revoke is logged as it is sent
    assert "revoked" not in gateway.log_text(before)
