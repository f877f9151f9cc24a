"""Bad input gets the status Ollama (or OpenAI) would give, with a JSON error body."""

from __future__ import annotations

import json

import httpx
import pytest

from app.bench.harness import LocalFleet
from tests.gateway.conftest import MAX_BODY, Gateway

MODEL = "llama3.2:3b"


@pytest.fixture
def http(gateway: Gateway, healthy_fleet: LocalFleet) -> httpx.Client:
    with httpx.Client(base_url=gateway.url, headers=gateway.auth(), timeout=30) as client:
        yield client


def test_missing_or_invalid_key_is_401(gateway: Gateway, healthy_fleet: LocalFleet) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    for headers in ({}, {"Authorization": "Bearer crl_nope"}, {"Authorization": "Basic x"}):
        reply = httpx.post(gateway.url + "/api/generate", json=body, headers=headers, timeout=10)
        assert reply.status_code == 401
        assert "corral keys add" in reply.json()["error"]
        assert reply.headers["www-authenticate"] == "Bearer"
    # A malformed body from a stranger is still a 401: auth runs before the body is read.
    reply = httpx.post(gateway.url + "/api/chat", content=b"{nope", timeout=10)
    assert reply.status_code == 401


def test_tier_the_key_may_not_use_is_403(gateway: Gateway, http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    batch_only = gateway.auth(gateway.batch_key)
    assert http.post("/api/generate", json=body, headers=batch_only).status_code == 200
    denied = http.post(
        "/api/generate", json=body, headers=batch_only | {"X-Corral-Tier": "interactive"}
    )
    assert denied.status_code == 403
    assert "may not use tier 'interactive'" in denied.json()["error"]
    openai_denied = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "x"},
        headers=batch_only | {"X-Corral-Tier": "normal"},
    )
    assert openai_denied.status_code == 403
    assert openai_denied.json()["error"]["type"] == "permission_error"


def test_bad_headers_are_400(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    vip = http.post("/api/generate", json=body, headers={"X-Corral-Tier": "vip"})
    assert vip.status_code == 400 and "unknown tier" in vip.json()["error"]
    reply = http.post("/api/generate", json=body, headers={"X-Corral-Priority": "11"})
    assert reply.status_code == 400 and "0-9" in reply.json()["error"]


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = {"model": MODEL, "prompt": "x" * (MAX_BODY + 1), "stream": False}
    reply = http.post("/api/generate", json=big)
    assert reply.status_code == 413 and "CORRAL_GATEWAY_MAX_BODY_BYTES" in reply.json()["error"]
    # Chunked, with no Content-Length: counted as it arrives.
    chunks = iter([b'{"model":"m","prompt":"', b"x" * MAX_BODY, b'"}'])
    reply = http.post("/v1/completions", content=chunks)
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_missing_body_are_400(http: httpx.Client) -> None:
    reply = http.post(
        "/api/generate", content=b'{"model": "x",', headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 400 and reply.json()["error"].startswith("invalid JSON")
    reply = http.post("/api/chat")
    assert (reply.status_code, reply.json()) == (400, {"error": "missing request body"})


def test_missing_model_as_ollama_answers_it(http: httpx.Client) -> None:
    generate = http.post("/api/generate", json={"prompt": "hi"})
    assert (generate.status_code, generate.json()) == (404, {"error": "model '' not found"})
    for path, body in [
        ("/api/chat", {"messages": []}),
        ("/api/embed", {"input": "x"}),
        ("/api/embeddings", {"prompt": "x"}),
        ("/api/show", {}),
    ]:
        reply = http.post(path, json=body)
        assert (reply.status_code, reply.json()) == (400, {"error": "model is required"}), path


def test_invalid_fields_are_400_with_the_validation_text(http: httpx.Client) -> None:
    # A known option of the wrong type (an unknown one is ignored: test_gateway_bodies.py).
    reply = http.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_ctx": "big"}},
    )
    assert reply.status_code == 400
    assert "options.num_ctx" in reply.json()["error"]
    wrong_type = http.post("/api/generate", json={"model": MODEL, "prompt": 5})
    assert wrong_type.status_code == 400 and "prompt" in wrong_type.json()["error"]
    openai = http.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert openai.status_code == 400 and openai.json()["error"]["message"]


def test_rejected_by_ollama_passes_its_status_through(http: httpx.Client) -> None:
    # The simulated llama has no thinking capability: Ollama answers 400, not retried.
    reply = http.post(
        "/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "think": True,
            "stream": False,
        },
    )
    assert reply.status_code == 400 and "does not support thinking" in reply.json()["error"]


def test_unknown_paths_and_model_management(http: httpx.Client) -> None:
    missing = http.get("/api/nope")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    pull = http.post("/api/pull", json={"model": MODEL})
    assert pull.status_code == 501 and "ollama pull" in pull.json()["error"]


def test_job_failing_everywhere_is_502_before_any_token(
    http: httpx.Client, healthy_fleet: LocalFleet
) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    body = {"model": MODEL, "prompt": "doomed"}
    plain = http.post("/api/generate", json=body | {"stream": False})
    assert plain.status_code == 502 and "gave up after 3 attempts" in plain.json()["error"]
    # Streamed: the failure comes before the first token, so it still gets a real status.
    with http.stream(
        "POST",
        "/api/chat",
        json={"model": MODEL, "messages": [{"role": "user", "content": "doomed"}]},
    ) as streamed:
        assert streamed.status_code == 502
        assert "gave up" in json.loads(streamed.read())["error"]
    openai = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "doomed"}]},
    )
    assert openai.status_code == 502 and openai.json()["error"]["type"] == "api_error"
