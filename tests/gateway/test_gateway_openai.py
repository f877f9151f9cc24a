"""The official ``openai`` client against the gateway's ``/v1``."""

from __future__ import annotations

import time

import openai
import pytest

from app.bench.harness import LocalFleet
from tests.gateway.conftest import Gateway

MODEL = "llama3.2:3b"
EMBED = "nomic-embed-text"


@pytest.fixture
def client(gateway: Gateway, healthy_fleet: LocalFleet) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=gateway.key, timeout=30, max_retries=0
    )


def test_models_list(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {MODEL, f"{EMBED}:latest"} <= ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0.2,
        seed=7,
        stop=["\n"],
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # max_tokens became num_predict
    assert reply.usage and reply.usage.completion_tokens == 5
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")


def test_chat_completion_streams(client: openai.OpenAI) -> None:
    started = time.monotonic()
    first_at, deltas, finish, usage = None, [], None, None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a long answer"}],
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    for event in stream:
        first_at = first_at or time.monotonic()
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    ended = time.monotonic()
    assert first_at - started < (ended - started) / 2
    assert len("".join(deltas).split()) == 200
    assert finish == "length" and usage and usage.completion_tokens == 200


def test_completion_with_and_without_stream(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert reply.choices[0].text and reply.object == "text_completion"
    assert reply.usage and reply.usage.completion_tokens == 6
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="x", max_tokens=6, stream=True)
        if c.choices
    )
    assert len(text.split()) == 6


def test_embeddings_base64_default_and_float(client: openai.OpenAI) -> None:
    # The client asks for base64 unless told otherwise, and decodes it.
    packed = client.embeddings.create(model=EMBED, input=["a", "b"])
    floats = client.embeddings.create(model=EMBED, input=["a", "b"], encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1]
    assert packed.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_errors_in_openais_shape(gateway: Gateway, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[])
    assert "too short" in bad.value.message
    stranger = openai.OpenAI(base_url=gateway.url + "/v1", api_key="crl_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        stranger.models.list()
    assert denied.value.body["code"] == "invalid_api_key"
