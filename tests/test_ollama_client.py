"""Malformed and truncated answers from an instance become typed, retryable errors.

A tiny HTTP server stands in for a broken Ollama: each path answers one way it can go wrong.
Every error here is transient (``InstanceFailed``), so the executor frees the slot and sends
the job to another instance (tests/test_core.py covers that path end to end).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.errors import InstanceFailed, RequestRejected
from app.jobs.ollama_client import OllamaClient
from app.schemas import InferRequest

FINAL = b'{"response":"","done":true,"eval_count":2}\n'

#: What the broken server sends for each mode: (status, body).
ANSWERS: dict[str, tuple[int, bytes]] = {
    "not-json": (200, b"<html>proxy error</html>"),
    "json-list": (200, b"[1, 2, 3]"),
    "no-embeddings": (200, b'{"model":"m"}'),
    "cut-mid-line": (200, b'{"response":"Hel","done":false}\n{"response":"lo'),
    "no-final-line": (200, b'{"response":"Hello","done":false}\n'),
    "error-line": (200, b'{"response":"Hi","done":false}\n{"error":"model runner crashed"}\n'),
    "garbage-line": (200, b'{"response":"Hi","done":false}\nnot json at all\n' + FINAL),
    "ok": (200, b'{"response":"Hi","done":false}\n' + FINAL),
    "bad-request": (400, b'{"error":"invalid options"}'),
    # A chat stream as Ollama sends it: thinking and content by pieces, the tool call whole
    # in a chunk of its own, a last line without them.
    "chat-tools": (
        200,
        b'{"message":{"role":"assistant","content":"","thinking":"Let me "},"done":false}\n'
        b'{"message":{"role":"assistant","content":"","thinking":"check."},"done":false}\n'
        b'{"message":{"role":"assistant","content":"Calling."},"done":false}\n'
        b'{"message":{"role":"assistant","content":"","tool_calls":[{"id":"call_a1b2c3d4",'
        b'"function":{"index":0,"name":"get_weather","arguments":{"city":"Paris"}}}]},'
        b'"done":false}\n'
        b'{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
        b'"eval_count":9}\n',
    ),
}


class Broken(BaseHTTPRequestHandler):
    mode = "ok"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = ANSWERS[type(self).mode]
        self.send_response(status)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def call(url: str, mode: str, kind: str = "generate") -> object:
    Broken.mode = mode
    client = OllamaClient("broken", url, connect_timeout=2, read_timeout=5)
    fields: dict[str, object] = {"prompt": "hi"}
    if kind == "embed":
        fields = {"input": ["x"]}
    elif kind == "chat":
        fields = {"messages": [{"role": "user", "content": "weather? use get_weather"}]}
    return client.infer(InferRequest(kind=kind, model="m", **fields))


@pytest.mark.parametrize(
    ("mode", "kind", "says"),
    [
        ("not-json", "embed", "not JSON"),
        ("json-list", "embed", "not a JSON object"),
        ("no-embeddings", "embed", "no 'embeddings'"),
        ("cut-mid-line", "generate", "malformed line"),
        ("no-final-line", "generate", "before its final line"),
        ("error-line", "generate", "model runner crashed"),
        ("garbage-line", "generate", "malformed line"),
    ],
)
def test_a_broken_answer_is_a_transient_typed_error(
    server: str, mode: str, kind: str, says: str
) -> None:
    with pytest.raises(InstanceFailed) as info:
        call(server, mode, kind)
    assert says in str(info.value) and info.value.transient
    assert info.value.instance == "broken"


def test_a_whole_answer_still_parses(server: str) -> None:
    answer = call(server, "ok")
    assert answer.text == "Hi" and answer.completion_tokens == 2


def test_a_rejected_request_is_not_retried(server: str) -> None:
    with pytest.raises(RequestRejected) as info:
        call(server, "bad-request")
    assert not info.value.transient and "invalid options" in str(info.value)


def test_a_chat_keeps_what_came_before_the_last_line(server: str) -> None:
    answer = call(server, "chat-tools", "chat")
    assert answer.text == "Calling." and answer.completion_tokens == 9
    assert answer.message == {
        "role": "assistant",
        "content": "Calling.",
        "thinking": "Let me check.",
        "tool_calls": [
            {
                "id": "call_a1b2c3d4",
                "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
