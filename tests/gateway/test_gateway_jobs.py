"""The job API: submit without blocking, poll, revoke (queued or running)."""

from __future__ import annotations

import time

import httpx
import pytest

from app.bench.harness import LocalFleet, wait_until
from tests.gateway.conftest import Gateway

MODEL = "llama3.2:3b"


@pytest.fixture
def http(gateway: Gateway, healthy_fleet: LocalFleet) -> httpx.Client:
    with httpx.Client(base_url=gateway.url, headers=gateway.auth(), timeout=30) as client:
        yield client


def _finished(http: httpx.Client, job_id: str) -> dict | None:
    view = http.get(f"/jobs/{job_id}").json()
    return view if view["state"] in ("succeeded", "failed", "revoked") else None


def test_submit_then_poll_the_result(http: httpx.Client) -> None:
    reply = http.post("/jobs", json={"model": MODEL, "prompt": "hi", "tier": "batch"})
    assert reply.status_code == 202 and reply.json()["state"] == "queued"
    job_id = reply.json()["id"]
    view = wait_until(lambda: _finished(http, job_id), 30, "the job to finish")
    assert view["state"] == "succeeded" and view["result"]["text"]
    assert (view["tier"], view["agent"]) == ("batch", "tester")
    assert view["result"]["routing"]["instance"]


def test_chat_and_embed_jobs(http: httpx.Client) -> None:
    ids = [
        http.post(
            "/jobs",
            json={"kind": "chat", "model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        ).json()["id"],
        http.post(
            "/jobs", json={"kind": "embed", "model": "nomic-embed-text", "input": ["a"]}
        ).json()["id"],
    ]
    chat, embed = (wait_until(lambda i=i: _finished(http, i), 30, "jobs") for i in ids)
    assert chat["result"]["message"]["content"] and embed["result"]["embeddings"]


def test_invalid_job_is_400_and_unknown_model_404(http: httpx.Client) -> None:
    bad = http.post("/jobs", json={"model": MODEL, "kind": "chat", "prompt": "x"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]
    assert http.post("/jobs", json={"model": "nope", "prompt": "x"}).status_code == 404
    gold = http.post("/jobs", json={"model": MODEL, "prompt": "x", "tier": "gold"})
    assert gold.status_code == 400


def test_jobs_are_private_to_their_agent(gateway: Gateway, http: httpx.Client) -> None:
    job_id = http.post("/jobs", json={"model": MODEL, "prompt": "mine"}).json()["id"]
    other = http.get(f"/jobs/{job_id}", headers=gateway.auth(gateway.batch_key))
    assert other.status_code == 404
    assert http.get("/jobs/no-such-job").status_code == 404
    # The batch-only key cannot put a job on the interactive tier through the body either.
    denied = http.post(
        "/jobs",
        json={"model": MODEL, "prompt": "x", "tier": "interactive"},
        headers=gateway.auth(gateway.batch_key),
    )
    assert denied.status_code == 403


def test_queued_job_can_be_revoked_and_never_runs(
    http: httpx.Client, healthy_fleet: LocalFleet
) -> None:
    # Fill every slot with slow batch jobs and the batch routers' threads with waiters, so
    # one more batch job stays a message in RabbitMQ.
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=40.0)
    body = {"model": MODEL, "prompt": "slow", "tier": "batch", "options": {"num_predict": 8}}
    blockers = [http.post("/jobs", json=body).json()["id"] for _ in range(6 + 16 + 2)]
    wait_until(
        lambda: sum(http.get(f"/jobs/{j}").json()["state"] == "running" for j in blockers) == 6,
        30,
        "every slot to be busy",
    )
    target = http.post("/jobs", json=body | {"prompt": "revoke me"}).json()["id"]
    assert http.get(f"/jobs/{target}").json()["state"] == "queued"
    revoked = http.delete(f"/jobs/{target}")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    # A running job is revoked too: its call to Ollama is closed (app.jobs.cancellation).
    running = next(j for j in blockers if http.get(f"/jobs/{j}").json()["state"] == "running")
    stopped = http.delete(f"/jobs/{running}")
    assert stopped.status_code == 200 and stopped.json() == {
        "id": running,
        "state": "revoked",
        "was": "running",
    }
    wait_until(lambda: _finished(http, running), 10, "the running job to end")
    assert http.get(f"/jobs/{running}").json()["state"] == "revoked"
    blockers.remove(running)
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    for j in blockers:
        wait_until(lambda j=j: _finished(http, j), 60, "the backlog to drain")
    time.sleep(0.5)
    assert http.get(f"/jobs/{target}").json()["state"] == "revoked"
    assert http.delete(f"/jobs/{target}").status_code == 409  # already ended
