"""The official ollama client, and raw HTTP, against the simulator's Ollama API."""

from __future__ import annotations

import json
import math
import re

import httpx
import ollama
import pytest


def test_health_version_and_unknown_paths(sim):
    root = sim.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["content-type"].startswith("text/plain")
    head = httpx.head(sim.url, timeout=5)
    assert (head.status_code, head.text) == (200, "")
    assert sim.get("/api/version").json() == {"version": "0.32.15"}
    missing = sim.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    wrong_method = sim.get("/api/generate")
    assert (wrong_method.status_code, wrong_method.text) == (405, "405 method not allowed")


def test_list_ps_and_show(sim):
    client = sim.client()
    names = [m.model for m in client.list().models]
    assert names == ["llama3.2:3b", "qwen2.5:7b", "nomic-embed-text:latest"]
    assert "llama3.2:3b" in [m.model for m in client.ps().models]
    running = next(m for m in client.ps().models if m.model == "llama3.2:3b")
    assert running.context_length == 4096
    assert running.size_vram == running.size
    assert running.expires_at.year > 2300  # preloaded models never expire

    shown = client.show("llama3.2:3b")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.details.parameter_size == "3.2B"
    assert client.show("nomic-embed-text").capabilities == ["embedding"]


def test_generate(sim):
    reply = sim.client().generate(model="llama3.2:3b", prompt="Why is the sky blue?")
    assert reply.done and reply.done_reason == "stop"
    assert reply.eval_count == 24 == len(reply.response.split())
    assert reply.prompt_eval_count > 0 and reply.context
    assert reply.total_duration >= reply.eval_duration > 0
    assert reply.load_duration < 50_000_000  # already loaded: no load time


def test_generate_stream(sim):
    parts = list(
        sim.client().generate(
            model="llama3.2:3b", prompt="hi", stream=True, options={"num_predict": 5}
        )
    )
    *tokens, final = parts
    assert len(tokens) == 5 and not any(p.done for p in tokens)
    assert final.done and final.done_reason == "length" and final.response == ""
    assert final.eval_count == 5 and final.context


def test_server_streams_by_default(sim):
    reply = sim.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi"})
    assert reply.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines[-1]["done"] is True and len(lines) == 25


def test_chat(sim):
    messages = [{"role": "user", "content": "Hello there"}]
    reply = sim.client().chat(model="llama3.2:3b", messages=messages)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done_reason == "stop"
    options = {"temperature": 0}
    whole = sim.client().chat(model="llama3.2:3b", messages=messages, options=options)
    parts = list(
        sim.client().chat(model="llama3.2:3b", messages=messages, options=options, stream=True)
    )
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == len(parts) - 1 == 24


def test_deterministic_only_when_asked(sim):
    client = sim.client()

    def answer(**options):
        return client.generate(model="llama3.2:3b", prompt="same", options=options).response

    assert answer(temperature=0) == answer(temperature=0)
    assert answer(seed=7) == answer(seed=7) != answer(seed=8)
    assert answer(seed=7, num_predict=5) == " ".join(answer(seed=7).split(" ")[:5])
    assert answer() != answer()


def test_load_and_unload(sim):
    client = sim.client()
    loaded = client.generate(model="qwen2.5:7b")
    assert loaded.done_reason == "load" and loaded.response == ""
    assert "qwen2.5:7b" in sim.loaded()
    unloaded = client.chat(model="qwen2.5:7b", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "qwen2.5:7b" not in sim.loaded()


def test_an_embedding_model_unloads_through_generate(sim):
    """`ollama stop` sends keep_alive 0 to /api/generate whatever the model: Ollama checks for
    the unload before the model's capabilities (routes.go), so an embedding model unloads too."""
    client, embed = sim.client(), "nomic-embed-text:latest"
    assert client.embed(model="nomic-embed-text", input=[]).embeddings == []  # a preload
    assert embed in sim.loaded()
    unloaded = client.generate(model="nomic-embed-text", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert embed not in sim.loaded()
    assert client.embed(model="nomic-embed-text", input=[]).embeddings == []
    assert embed in sim.loaded()  # loaded again by an empty input
    with pytest.raises(ollama.ResponseError, match="does not support generate"):
        client.generate(model="nomic-embed-text")  # a preload still is not


def test_events_give_the_timeline_of_loads_slots_and_unloads(sim):
    client, model = sim.client(), "qwen2.5:7b"
    client.generate(model=model, keep_alive=0)
    sim.post("/sim/reset").raise_for_status()
    client.generate(model=model, prompt="hi", options={"num_predict": 1})
    client.generate(model=model, keep_alive=0)
    events = sim.get("/sim/events").json()["events"]
    assert [(kind, name) for kind, name, _, _ in events] == [
        ("load", model),
        ("slot", model),
        ("unload", model),
    ]
    (_, _, load_start, load_end), (_, _, taken, freed), (_, _, gone, _) = events
    assert load_start < load_end <= taken < freed <= gone


def test_embed(sim):
    client = sim.client()
    reply = client.embed(model="nomic-embed-text", input=["first text", "second text"])
    first, second = reply.embeddings
    assert len(first) == 768 and first != second
    assert math.isclose(sum(v * v for v in first), 1.0, rel_tol=1e-5)
    assert client.embed(model="nomic-embed-text", input="first text").embeddings[0] == first
    short = client.embed(model="nomic-embed-text", input="first text", dimensions=64)
    assert len(short.embeddings[0]) == 64
    assert math.isclose(sum(v * v for v in short.embeddings[0]), 1.0, rel_tol=1e-5)

    legacy = client.embeddings(model="nomic-embed-text", prompt="first text").embedding
    assert len(legacy) == 768 and sum(v * v for v in legacy) > 2  # not normalised
    assert client.embeddings(model="nomic-embed-text", prompt="").embedding == []


def test_pull_and_delete(sim):
    client = sim.client()
    statuses = [p.status for p in client.pull("mxbai-embed-large", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.pull("phi3").status == "success"
    assert client.show("mxbai-embed-large").capabilities == ["embedding"]
    # "phi3" names "phi3:latest"
    reply = client.generate(model="phi3", prompt="hi", options={"num_predict": 1})
    assert reply.done and reply.model == "phi3"  # echoed as sent

    assert client.delete("phi3").status == "success"
    assert "phi3:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("phi3")
    assert missing.value.status_code == 404


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda c: c.generate(model="nope", prompt="x"), 404, "model 'nope' not found"),
        (
            lambda c: c.chat(model="nope:7b", messages=[]),
            404,
            "model 'nope:7b' not found",
        ),
        (
            lambda c: c.embed(model="nope", input="x"),
            404,
            'model "nope" not found, try pulling it first',
        ),
        (lambda c: c.show("nope"), 404, "model 'nope:latest' not found"),
        (
            # The client refuses an empty model name itself, so send the body raw through it.
            lambda c: c._request_raw("POST", "/api/chat", json={"messages": []}),
            400,
            "model is required",
        ),
        (
            lambda c: c.chat(model="nomic-embed-text", messages=[]),
            400,
            '"nomic-embed-text" does not support chat',
        ),
        (
            lambda c: c.generate(model="llama3.2:3b", prompt="x", think=True),
            400,
            '"llama3.2:3b" does not support thinking',
        ),
    ],
)
def test_client_errors(sim, call, status, message):
    with pytest.raises(ollama.ResponseError) as error:
        call(sim.client())
    assert (error.value.status_code, error.value.error) == (status, message)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "missing request body"),
        (b'{"model": "llama3.2:3b"', 400, "unexpected EOF"),
        (b"hello", 400, "invalid character 'h' looking for beginning of value"),
        (
            b'{"model": 3}',
            400,
            "json: cannot unmarshal number into Go struct field GenerateRequest.model "
            "of type string",
        ),
        (
            b'{"model": "llama3.2:3b", "keep_alive": "300"}',
            400,
            'time: missing unit in duration "300"',
        ),
        (
            b'{"model": "llama3.2:3b", "prompt": "x", "options": {"num_ctx": "big"}}',
            500,
            'option "num_ctx" must be of type integer',
        ),
        (b'{"prompt": "x"}', 404, "model '' not found"),
    ],
)
def test_raw_request_errors(sim, body, status, message):
    reply = sim.post("/api/generate", content=body)
    assert (reply.status_code, reply.json()) == (status, {"error": message})


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
        },
    },
}


def test_chat_calls_a_tool_the_prompt_names_in_ollamas_shape(sim):
    asked = [{"role": "user", "content": "Weather in Paris? use get_weather"}]
    reply = sim.client().chat(model="llama3.2:3b", messages=asked, tools=[WEATHER_TOOL])
    assert reply.done_reason == "stop" and reply.message.content == ""
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "sim", "unit": "celsius"}
    raw = sim.post(
        "/api/chat",
        json={"model": "llama3.2:3b", "messages": asked, "tools": [WEATHER_TOOL]},
    )
    # Streamed: the call whole in one chunk (no text before it), then a last line without it.
    (chunk, final) = [json.loads(line) for line in raw.text.splitlines()]
    assert chunk["done"] is False and chunk["message"]["content"] == ""
    (streamed,) = chunk["message"]["tool_calls"]
    assert re.fullmatch(r"call_[a-z0-9]{8}", streamed["id"])
    assert streamed["function"] == {
        "index": 0,
        "name": "get_weather",
        "arguments": {"city": "sim", "unit": "celsius"},
    }
    assert final["done"] and "tool_calls" not in final["message"] and final["eval_count"] > 0
    # Without the tool's name, or once the tool answered: text, as a model would.
    for messages in (
        [{"role": "user", "content": "Weather in Paris?"}],
        [*asked, {"role": "tool", "content": "sunny"}],
    ):
        plain = sim.client().chat(model="llama3.2:3b", messages=messages, tools=[WEATHER_TOOL])
        assert plain.message.content and not plain.message.tool_calls
