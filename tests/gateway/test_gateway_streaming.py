"""Streams across retries: never a duplicated token; an error line when they cannot join."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from app.bench.harness import LocalFleet
from app.gateway.dedup import StreamDiverged, StreamGuard
from app.jobs.relay import token_relay
from tasks import infer
from tests.gateway.conftest import Gateway

MODEL = "llama3.2:3b"


# The guard on its own -----------------------------------------------------------------


def _texts(guard: StreamGuard, feed: list[tuple[object, str, bool]]) -> list[str | None]:
    out = []
    for run, text, done in feed:
        chunk = guard.feed(run, {"response": text, "done": done})
        out.append(None if chunk is None else chunk["response"])
    return out


def test_guard_sends_only_what_the_retry_adds() -> None:
    guard = StreamGuard("generate")
    feed = [
        (1, "The sky", False),
        (1, " is", False),
        (2, "The", False),
        (2, " sky is bl", False),
        (2, "ue.", False),
        (2, "", True),
    ]
    assert _texts(guard, feed) == ["The sky", " is", None, " bl", "ue.", ""]


def test_guard_refuses_a_retry_that_says_something_else() -> None:
    guard = StreamGuard("generate")
    _texts(guard, [(1, "The sky", False)])
    with pytest.raises(StreamDiverged):
        guard.feed(2, {"response": "A cloud", "done": False})
    short = StreamGuard("generate")
    _texts(short, [(1, "The sky is", False)])
    with pytest.raises(StreamDiverged):
        short.feed(2, {"response": "The sky", "done": True})


def test_guard_tracks_chat_content_and_tool_calls() -> None:
    guard = StreamGuard("chat")
    call = {"function": {"name": "f", "arguments": {}}}
    first = guard.feed(1, {"message": {"role": "assistant", "content": "ok", "tool_calls": [call]}})
    assert first == {"message": {"role": "assistant", "content": "ok", "tool_calls": [call]}}
    again = guard.feed(2, {"message": {"role": "assistant", "content": "ok", "tool_calls": [call]}})
    assert again is None
    final = guard.feed(2, {"message": {"role": "assistant", "content": ""}, "done": True})
    assert final == {"message": {"role": "assistant", "content": ""}, "done": True}


# Through the fleet --------------------------------------------------------------------


def _stream(http: httpx.Client, options: dict) -> tuple[str, str | None, str]:
    """One streamed generate: (text received, the error line's text or None, job id)."""
    body = {"model": MODEL, "prompt": f"retry {uuid.uuid4()}", "options": options}
    text, error = "", None
    with http.stream("POST", "/api/generate", json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-ndjson"
        for line in reply.iter_lines():
            chunk = json.loads(line)
            if "error" in chunk:
                error = chunk["error"]
            else:
                text += chunk["response"]
        return text, error, reply.headers["x-corral-job-id"]


def _retried_stream(http: httpx.Client, options: dict) -> tuple[str, str | None, str]:
    """Stream until a job was retried after tokens had been relayed (bounded)."""
    for _ in range(12):
        text, error, job = _stream(http, options)
        if len({e.attempt for e in token_relay().read(job, block_ms=0)}) > 1:
            return text, error, job
    raise AssertionError("no job was retried mid-stream in 12 tries")


@pytest.fixture
def http(gateway: Gateway, healthy_fleet: LocalFleet) -> httpx.Client:
    # Two of three instances break every stream halfway: a job that starts on one of them
    # is retried on another after tokens were already relayed.
    for name in list(healthy_fleet.sim_urls)[:2]:
        healthy_fleet.faults(name, mid_stream_error_rate=1.0)
    with httpx.Client(base_url=gateway.url, headers=gateway.auth(), timeout=30) as client:
        yield client


def test_deterministic_stream_continues_seamlessly_after_a_retry(http: httpx.Client) -> None:
    text, error, job = _retried_stream(http, {"temperature": 0, "num_predict": 100})
    assert error is None
    result = infer.AsyncResult(job).get(timeout=30)
    assert result.routing.attempts >= 2
    assert text == result.text  # every token once, in order
    assert len(text.split()) == 100


def test_sampled_stream_ends_with_an_error_line_after_a_retry(http: httpx.Client) -> None:
    text, error, _ = _retried_stream(http, {"num_predict": 100})
    # The official client raises this line as ResponseError(status_code=-1).
    assert error is not None and "differs from the text already sent" in error
    assert 0 < len(text.split()) < 100
