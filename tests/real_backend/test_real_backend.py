"""Corral in front of a real model server (llama.cpp + SmolLM2-135M behind an Ollama-API
proxy), as a user would run it against real Ollama servers: through ``infer`` and through
the gateway with the official ``ollama`` client."""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import pytest

from app.jobs.relay import token_relay
from tasks import infer
from tests.gateway.conftest import start_gateway

pytestmark = [pytest.mark.fleet, pytest.mark.real_backend]

CHAT_MODEL = "smollm2:135m"
EMBED_MODEL = "emb/smollm2-embed:latest"
INSTANCE = "real-1"  # as registered by the real_backend fixture


def test_generate_on_a_real_model(real_backend: str) -> None:
    out = infer.delay(
        model=CHAT_MODEL,
        prompt="What is the capital of France?",
        options={"num_predict": 16, "temperature": 0},
        tier="interactive",
        cache=False,
    ).get(timeout=120)
    assert out.routing.instance == INSTANCE
    assert out.text.strip() and out.completion_tokens > 0


def test_streaming_chat_on_a_real_model(real_backend: str) -> None:
    job = infer.delay(
        model=CHAT_MODEL,
        kind="chat",
        stream=True,
        cache=False,
        messages=[{"role": "user", "content": "Say hello in three words."}],
        options={"num_predict": 24},
    )
    result = job.get(timeout=120)
    entries = token_relay().read(job.id, block_ms=0)
    streamed = "".join(e.chunk.get("message", {}).get("content", "") for e in entries)
    assert result.message["content"] and streamed == result.message["content"]
    assert len(entries) > 2 and entries[-1].chunk["done"] is True


def test_embeddings_from_a_real_model(real_backend: str) -> None:
    out = infer.delay(model=EMBED_MODEL, kind="embed", input=["cat", "kitten", "tax law"]).get(
        timeout=120
    )
    cat, kitten, tax = out.embeddings
    assert len(cat) == 576 and cat != kitten != tax
    again = infer.delay(model=EMBED_MODEL, kind="embed", input=["cat"], cache=False).get(
        timeout=120
    )
    assert again.embeddings[0] == pytest.approx(cat, abs=1e-4)  # a real, deterministic model


@pytest.fixture(scope="module")
def open_gateway(real_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway with auth off (the local-demo setting), as a newcomer would start it."""
    child, url = start_gateway(
        tmp_path_factory.mktemp("real-gateway"), "gateway-real", CORRAL_GATEWAY_AUTH="false"
    )
    try:
        yield url
    finally:
        child.stop()


def test_official_ollama_client_through_the_gateway(open_gateway: str) -> None:
    client = ollama.Client(host=open_gateway)
    assert CHAT_MODEL in {m.model for m in client.list().models}

    generated = client.generate(
        model=CHAT_MODEL, prompt="Name a colour.", options={"num_predict": 8, "temperature": 0}
    )
    assert generated.response.strip() and generated.done

    parts = list(
        client.chat(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Count to five."}],
            options={"num_predict": 24},
            stream=True,
        )
    )
    assert len(parts) > 2 and parts[-1].done
    assert "".join(p.message.content or "" for p in parts).strip()

    embedded = client.embed(model=EMBED_MODEL, input=["cat", "kitten"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 576
