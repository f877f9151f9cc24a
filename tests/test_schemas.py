"""Request validation and the cache key: pure, no services."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import InferRequest


def test_model_names_get_ollamas_default_tag() -> None:
    assert InferRequest(model="llama3.2", prompt="x").model == "llama3.2:latest"
    assert InferRequest(model="ns/m:7b", prompt="x").model == "ns/m:7b"


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "m", "kind": "chat", "prompt": "x", "messages": [{"role": "user"}]},
        {"model": "m", "kind": "embed"},
        {"model": "m", "prompt": "x", "keep_alive": ["5m"]},
        {"model": "m", "prompt": "x", "options": {"num_ctx": 2.5}},
        {"model": "m", "kind": "chat", "messages": [{"role": "robot", "content": "x"}]},
        {"model": "m", "prompt": "x", "surprise": 1},
    ],
)
def test_invalid_requests(fields: dict) -> None:
    with pytest.raises(ValidationError):
        InferRequest.model_validate(fields)


def test_deterministic_requests() -> None:
    assert InferRequest(model="m", kind="embed", input="x").deterministic
    assert InferRequest(model="m", prompt="x", options={"temperature": 0}).deterministic
    assert InferRequest(model="m", prompt="x", options={"seed": 3}).deterministic
    assert not InferRequest(model="m", prompt="x", options={"seed": -1}).deterministic
    assert not InferRequest(model="m", prompt="x").deterministic


def test_cache_key_ignores_who_asks_and_how_urgently() -> None:
    a = InferRequest(model="m", prompt="x", tier="batch", agent="a", keep_alive="5m")
    b = InferRequest(model="m:latest", prompt="x", tier="interactive", priority=9)
    c = InferRequest(model="m", prompt="y")
    assert a.cache_key() == b.cache_key() != c.cache_key()


def test_ollama_body_streams_text_and_keeps_only_ollama_fields() -> None:
    body = InferRequest(
        model="m", prompt="x", tier="batch", options={"num_predict": 3}
    ).ollama_body(stream=True)
    assert body == {
        "model": "m:latest",
        "prompt": "x",
        "stream": True,
        "options": {"num_predict": 3},
    }
