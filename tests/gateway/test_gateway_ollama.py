"""The official ``ollama`` client against the gateway: every call it makes, streaming too."""

from __future__ import annotations

import time

import httpx
import ollama
import pytest

from app.bench.harness import LocalFleet
from tests.gateway.conftest import Gateway

MODEL = "llama3.2:3b"
EMBED = "nomic-embed-text"


@pytest.fixture
def client(gateway: Gateway, healthy_fleet: LocalFleet) -> ollama.Client:
    return ollama.Client(host=gateway.url, headers=gateway.auth(), timeout=30)


def test_list_shows_the_fleets_models_with_details(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert {MODEL, f"{EMBED}:latest"} <= set(models)
    assert models[MODEL].details is not None and models[MODEL].details.family


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(model=MODEL, prompt="Why is the sky blue?")
    assert reply.done and reply.response
    assert reply.done_reason in ("stop", "length")
    assert reply.eval_count and reply.eval_count > 0
    assert reply.total_duration and reply.total_duration > 0


def test_generate_streams_first_token_before_the_end(client: ollama.Client) -> None:
    started = time.monotonic()
    chunks, first_at = [], None
    for chunk in client.generate(
        model=MODEL, prompt="tell a long story", stream=True, options={"num_predict": 200}
    ):
        first_at = first_at or time.monotonic()
        chunks.append(chunk)
    ended = time.monotonic()
    assert len(chunks) > 2
    assert chunks[-1].done and chunks[-1].eval_count == 200
    assert not any(c.done for c in chunks[:-1])
    # 200 tokens at 400 tok/s take 0.5 s: the first must come well before the last.
    assert first_at - started < (ended - started) / 2


def test_chat(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done


def test_chat_streams_first_chunk_before_the_end(client: ollama.Client) -> None:
    started = time.monotonic()
    parts, first_at = [], None
    stream = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "a long answer please"}],
        stream=True,
        options={"num_predict": 200},
    )
    for chunk in stream:
        first_at = first_at or time.monotonic()
        parts.append(chunk.message.content)
    ended = time.monotonic()
    assert first_at - started < (ended - started) / 2
    assert len("".join(parts).split()) == 200


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    reply = client.embed(model=EMBED, input=["a", "b"])
    assert len(reply.embeddings) == 2 and len(reply.embeddings[0]) > 10
    legacy = client.embeddings(model=EMBED, prompt="a")
    assert len(legacy.embedding) == len(reply.embeddings[0])
    assert client.embeddings(model=EMBED, prompt="").embedding == []


def test_show_and_ps(client: ollama.Client) -> None:
    shown = client.show(MODEL)
    assert shown.modelinfo and shown.details and shown.details.family
    with pytest.raises(ollama.ResponseError) as err:
        client.show("no-such-model")
    assert err.value.status_code == 404
    assert "no-such-model:latest" in err.value.error
    loaded = client.ps().models
    assert loaded and all(m.model for m in loaded)


def test_unknown_model_is_404_in_ollamas_words(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="no-such-model", prompt="hi")
    assert (err.value.status_code, err.value.error) == (404, "model 'no-such-model' not found")
    with pytest.raises(ollama.ResponseError) as err:
        list(
            client.chat(
                model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="no-such-model", input="x")
    assert err.value.error == 'model "no-such-model" not found, try pulling it first'


def test_public_endpoints_need_no_key(gateway: Gateway, healthy_fleet: LocalFleet) -> None:
    root = httpx.get(gateway.url + "/", timeout=10)
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert httpx.head(gateway.url + "/", timeout=10).status_code == 200
    assert httpx.get(gateway.url + "/api/version", timeout=10).json()["version"]


def test_routing_headers_tell_where_the_job_ran(
    gateway: Gateway, healthy_fleet: LocalFleet
) -> None:
    reply = httpx.post(
        gateway.url + "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False},
        headers=gateway.auth() | {"X-Corral-Tier": "interactive", "X-Corral-Priority": "9"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-corral-instance"] in healthy_fleet.sim_urls
    assert reply.headers["x-corral-job-id"]
    body = reply.json()
    assert list(body)[:5] == ["model", "created_at", "response", "done", "done_reason"]
    assert body["created_at"].endswith("Z")
