"""Calls to one Ollama server, with every failure turned into a typed error.

Text generation always streams from Ollama, even when nobody relays the tokens: a stream that
breaks or ends without its final line is then detected as such (and retried) instead of
looking like a short answer. Every call has a connect timeout and a read timeout, because the
threads pool the instance workers use has no task time limits; the read timeout
(``request_timeout``) is the outer bound, and a :class:`~app.jobs.call_guard.Call` given to
``infer`` lets the worker's watchdog close the call sooner (its job was revoked, or it is
silent for far longer than it should be).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from app.errors import (
    InstanceBusy,
    InstanceFailed,
    InstanceSilent,
    InstanceTimeout,
    InstanceUnavailable,
    JobCancelled,
    OllamaError,
    RequestRejected,
)
from app.jobs.call_guard import Call, current_call, guarded_session
from app.schemas import Answer, InferRequest, Timings

_NS = 1e9
_local = threading.local()


def _session() -> requests.Session:
    # One keep-alive session per worker thread: requests.Session is not thread-safe.
    if not hasattr(_local, "session"):
        _local.session = guarded_session()
    session: requests.Session = _local.session
    return session


TokenSink = Callable[[dict[str, Any]], None]


class OllamaClient:
    def __init__(
        self, instance: str, base_url: str, *, connect_timeout: float, read_timeout: float
    ) -> None:
        self.instance = instance
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)

    # Inference ------------------------------------------------------------------------

    def infer(
        self, request: InferRequest, on_chunk: TokenSink | None = None, call: Call | None = None
    ) -> Answer:
        """Run one request; ``on_chunk`` sees every streamed chunk (for relaying tokens).

        With ``call``, the request can be closed by a watchdog: JobCancelled is raised when
        its job was revoked, InstanceSilent when it was silent for too long.
        """
        with current_call(call):
            try:
                return self._infer(request, on_chunk, call)
            except OllamaError as exc:
                if call is None or call.reason is None:
                    raise
                if call.reason == "cancelled":
                    raise JobCancelled(f"job {call.job} was revoked") from exc
                raise InstanceSilent(
                    f"silent for {call.quiet_for(time.monotonic()):.1f} s"
                    f" (allowed {call.allowed() or 0.0:.1f} s)",
                    self.instance,
                ) from exc

    def _infer(
        self, request: InferRequest, on_chunk: TokenSink | None, call: Call | None
    ) -> Answer:
        if request.kind == "embed":
            data = self._post("/api/embed", request.ollama_body(stream=False))
            embeddings = data.get("embeddings")
            if not isinstance(embeddings, list):
                raise InstanceFailed("malformed embed answer: no 'embeddings'", self.instance)
            return Answer(
                embeddings=embeddings,
                prompt_tokens=int(data.get("prompt_eval_count") or 0),
                timings=_timings(data),
            )
        path = "/api/chat" if request.kind == "chat" else "/api/generate"
        return self._stream(path, request.ollama_body(stream=True), request.kind, on_chunk, call)

    def _stream(
        self,
        path: str,
        body: dict[str, Any],
        kind: str,
        on_chunk: TokenSink | None,
        call: Call | None,
    ) -> Answer:
        parts: list[str] = []
        # A chat stream's other message fields come in their own chunks, not in the last
        # line: thinking as text, each tool call whole (Ollama's parser buffers it).
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        final: dict[str, Any] | None = None
        with self._request("POST", path, json=body, stream=True) as resp:
            for chunk in self._lines(resp):
                if call is not None:
                    call.chunk()
                if "error" in chunk:
                    raise InstanceFailed(f"error in stream: {chunk['error']}", self.instance)
                if kind == "chat":
                    message = chunk.get("message") or {}
                    parts.append(message.get("content", ""))
                    thinking.append(message.get("thinking") or "")
                    calls.extend(message.get("tool_calls") or [])
                else:
                    parts.append(chunk.get("response", ""))
                if on_chunk is not None:
                    on_chunk(chunk)
                if chunk.get("done"):
                    final = chunk
                    break
        if final is None:
            raise InstanceFailed("stream ended before its final line", self.instance)
        text = "".join(parts)
        message = None
        if kind == "chat":
            message = {**(final.get("message") or {}), "role": "assistant", "content": text}
            if any(thinking):
                message["thinking"] = "".join(thinking)
            if calls:
                message["tool_calls"] = calls
        return Answer(
            text=text,
            message=message,
            done_reason=final.get("done_reason"),
            prompt_tokens=int(final.get("prompt_eval_count") or 0),
            completion_tokens=int(final.get("eval_count") or 0),
            timings=_timings(final),
        )

    def _lines(self, resp: requests.Response) -> Iterator[dict[str, Any]]:
        try:
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise InstanceFailed(f"malformed line in stream: {exc}", self.instance) from exc
        except requests.exceptions.ConnectionError as exc:
            # A read timeout mid-stream surfaces as ConnectionError from urllib3.
            if "timed out" in str(exc).lower():
                raise InstanceTimeout("no token for too long", self.instance) from exc
            raise InstanceFailed(f"stream broken: {exc}", self.instance) from exc
        except requests.exceptions.RequestException as exc:
            raise InstanceFailed(f"stream broken: {exc}", self.instance) from exc

    # Fleet discovery ------------------------------------------------------------------

    def version(self) -> str:
        version: str = self._get("/api/version").get("version", "")
        return version

    def tags(self) -> list[str]:
        return list(self.tag_sizes())

    def loaded(self) -> list[str]:
        return list(self.loaded_sizes())

    def tag_sizes(self) -> dict[str, int]:
        """``/api/tags``: each model the server has, with its size on disk (bytes)."""
        return _sizes(self._get("/api/tags"))

    def loaded_sizes(self) -> dict[str, int]:
        """``/api/ps``: each loaded model, with the memory it takes (bytes: weights, the KV
        cache for ``num_ctx`` x parallel requests, buffers; ``size``, not ``size_vram``, which
        is only its part on the GPU)."""
        return _sizes(self._get("/api/ps"))

    # What the server holds (the placement plan's moves, app.jobs.model_swap) ---------

    def unload(self, model: str, timeout: float) -> None:
        """``keep_alive: 0`` with an empty prompt: the server unloads ``model`` once its
        running requests end (what ``ollama stop`` sends). Ollama answers at once, and looks
        for the unload before the model's capabilities, so this unloads embedding models too.
        """
        self._post(
            "/api/generate", {"model": model, "keep_alive": 0}, timeout=(self.timeout[0], timeout)
        )

    def preload(self, model: str, timeout: float) -> str:
        """Load ``model`` without running anything: an empty prompt (Ollama's documented
        preload), or, for an embedding model (which /api/generate refuses with a 400 before
        loading anything), an empty input to /api/embed, which also loads it. The answer
        comes once the model is loaded: ``timeout`` bounds the wait. Returns the endpoint used.
        """
        limit = (self.timeout[0], timeout)
        try:
            self._post("/api/generate", {"model": model}, timeout=limit)
            return "generate"
        except RequestRejected as exc:
            if "does not support" not in str(exc):
                raise
        self._post("/api/embed", {"model": model, "input": []}, timeout=limit)
        return "embed"

    # HTTP -----------------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        with self._request("GET", path) as resp:
            return self._json(resp)

    def _post(self, path: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        with self._request("POST", path, json=body, **kwargs) as resp:
            return self._json(resp)

    def _json(self, resp: requests.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError as exc:
            raise InstanceFailed("answer is not JSON", self.instance, resp.status_code) from exc
        if not isinstance(data, dict):
            raise InstanceFailed("answer is not a JSON object", self.instance, resp.status_code)
        return data

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        try:
            kwargs.setdefault("timeout", self.timeout)
            resp = _session().request(method, url, **kwargs)
        except requests.exceptions.ConnectTimeout as exc:
            raise InstanceUnavailable("connect timed out", self.instance) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise InstanceTimeout("no answer in time", self.instance) from exc
        except requests.exceptions.ConnectionError as exc:
            raise InstanceUnavailable("cannot connect", self.instance) from exc
        except requests.exceptions.RequestException as exc:
            raise InstanceFailed(f"request failed: {exc}", self.instance) from exc
        if resp.status_code >= 400:
            with resp:
                raise self._http_error(resp)
        return resp

    def _http_error(self, resp: requests.Response) -> OllamaError:
        try:
            text = resp.json().get("error") or resp.text
        except ValueError:
            text = resp.text
        status = resp.status_code
        if status == 503:
            return InstanceBusy(text, self.instance, status)
        if status >= 500:
            return InstanceFailed(text, self.instance, status)
        return RequestRejected(text, self.instance, status)


def _sizes(data: dict[str, Any]) -> dict[str, int]:
    """The models of a /api/tags or /api/ps answer, with their ``size`` (0 when absent)."""
    return {m["name"]: int(m.get("size") or 0) for m in data.get("models", [])}


def _timings(data: dict[str, Any]) -> Timings:
    return Timings(
        total_s=(data.get("total_duration") or 0) / _NS,
        load_s=(data.get("load_duration") or 0) / _NS,
        prompt_eval_s=(data.get("prompt_eval_duration") or 0) / _NS,
        eval_s=(data.get("eval_duration") or 0) / _NS,
    )
