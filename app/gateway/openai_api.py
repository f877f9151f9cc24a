"""OpenAI's API (``/v1``), mapped onto Ollama's requests the way Ollama's own
``/v1`` endpoints map it (``middleware/openai.go``): ``max_tokens`` is ``num_predict``,
``temperature`` and ``top_p`` default to 1.0, ``stream`` defaults to false, streams are SSE
ending with ``data: [DONE]``, errors are ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from app.gateway import calls, shapes
from app.gateway.auth import Caller, CallerDep
from app.gateway.errors import GatewayError, error_body
from app.gateway.fleet_info import unix_time
from app.gateway.services import services
from app.gateway.streaming import stream_error
from app.schemas import InferResult
from app.settings import normalize_model

router = APIRouter(prefix="/v1")

SSE = "text/event-stream"
FINGERPRINT = "fp_ollama"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    # The openai client sends many optional fields; those without an effect here are ignored.
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = None
    logprobs: bool | int | None = None

    def checked(self) -> None:
        if not self.model:
            raise GatewayError(400, "model is required", param="model")
        if self.n not in (None, 1):
            raise GatewayError(400, "n > 1 is not supported: send n requests", param="n")
        if self.logprobs:
            raise GatewayError(400, "logprobs is not supported by Corral", param="logprobs")

    def options(self, max_tokens: int | None) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
        }
        extra = {
            "num_predict": max_tokens,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        }
        return options | {k: v for k, v in extra.items() if v is not None}


class ChatCompletionBody(_Body):
    messages: list[dict[str, Any]] = []
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] = ""
    suffix: str | None = None
    echo: bool | None = None


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None


# Requests -------------------------------------------------------------------------------


def _message(m: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat message as Ollama's: content parts joined, images as base64,
    tool-call arguments as objects, ``developer`` as ``system``."""
    role = "system" if m.get("role") == "developer" else m.get("role")
    out: dict[str, Any] = {"role": role, "content": ""}
    content = m.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:") or "," not in url:
                    raise GatewayError(
                        400, "only data: URLs are supported for images", param="messages"
                    )
                images.append(url.split(",", 1)[1])
        out["content"] = "\n".join(texts)
        if images:
            out["images"] = images
    elif isinstance(content, str):
        out["content"] = content
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
            for c in m["tool_calls"]
        ]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("name") and role == "tool":
        out["tool_name"] = m["name"]
    return out


def _arguments(call: dict[str, Any]) -> Any:
    args = call["function"].get("arguments") or "{}"
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        raise GatewayError(
            400, "tool call arguments must be a JSON object", param="messages"
        ) from None


def _format(response_format: dict[str, Any] | None) -> Any:
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        return (response_format or {}).get("json_schema", {}).get("schema") or "json"
    return None


# Answers --------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _tool_calls(calls_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.get("id") or f"call_{i}",
            "index": i,
            "type": "function",
            "function": {
                "name": c.get("function", {}).get("name", ""),
                "arguments": json.dumps(c.get("function", {}).get("arguments", {})),
            },
        }
        for i, c in enumerate(calls_)
    ]


def _finish_reason(done_reason: str | None, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _chat_reply(result: InferResult, model: str) -> dict[str, Any]:
    source = result.message or {}
    message: dict[str, Any] = {"role": "assistant", "content": result.text or ""}
    if source.get("thinking"):
        message["reasoning"] = source["thinking"]
    if source.get("tool_calls"):
        message["tool_calls"] = _tool_calls(source["tool_calls"])
    return {
        "id": f"chatcmpl-{result.id}",
        "object": "chat.completion",
        "created": int(result.routing.finished_at),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _finish_reason(result.done_reason, "tool_calls" in message),
            }
        ],
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
    }


def _completion_reply(result: InferResult, model: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{result.id}",
        "object": "text_completion",
        "created": int(result.routing.finished_at),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "text": result.text or "",
                "index": 0,
                "logprobs": None,
                "finish_reason": _finish_reason(result.done_reason, False),
            }
        ],
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


#: Native chunk (and whether it is the first) -> the OpenAI choice it becomes, or None.
Choice = Callable[[dict[str, Any], bool], dict[str, Any] | None]


async def _sse_stream(
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
    *,
    head: dict[str, Any],
    choice: Choice,
    finish: Callable[[str], dict[str, Any]],
    usage: bool,
) -> AsyncIterator[bytes]:
    """Native chunks as OpenAI SSE: content chunks, a finish chunk, usage, ``[DONE]``."""
    is_first, tools = True, False
    chunk: dict[str, Any] | None = first
    try:
        while chunk is not None:
            tools = tools or bool((chunk.get("message") or {}).get("tool_calls"))
            piece = choice(chunk, is_first)
            if piece is not None:
                yield _sse(head | {"choices": [piece]})
                is_first = False
            if chunk.get("done"):
                reason = _finish_reason(chunk.get("done_reason"), tools)
                yield _sse(head | {"choices": [finish(reason)]})
                if usage:
                    counts = _usage(chunk.get("prompt_eval_count", 0), chunk.get("eval_count", 0))
                    yield _sse(head | {"choices": [], "usage": counts})
                yield _sse("[DONE]")
                return
            chunk = await anext(rest, None)
    except Exception as exc:  # the status is sent: an error event, which the client raises
        error = stream_error(exc)
        yield _sse(error_body("/v1/", error.status, error.message, code=error.code))


def _chat_choice(chunk: dict[str, Any], first: bool) -> dict[str, Any] | None:
    message = chunk.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if message.get("content") or first:
        delta["content"] = message.get("content", "")
    if message.get("thinking"):
        delta["reasoning"] = message["thinking"]
    if message.get("tool_calls"):
        delta["tool_calls"] = _tool_calls(message["tool_calls"])
    if not delta:
        return None
    return {"index": 0, "delta": delta, "finish_reason": None}


def _text_choice(chunk: dict[str, Any], first: bool) -> dict[str, Any] | None:
    text = chunk.get("response", "")
    if not text and not first:
        return None
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": None}


async def _complete(
    request: Request,
    body: ChatCompletionBody | CompletionBody,
    fields: dict[str, Any],
    who: Caller,
) -> Response:
    kind = fields["kind"]
    fields |= who.job_fields() | {"stream": body.stream}
    job_id = await calls.submit(request, fields, not_found=f"model '{body.model}' not found")
    model = normalize_model(body.model)
    chat = kind == "chat"
    if not body.stream:
        result = await calls.wait(request, job_id, model)
        reply = (_chat_reply if chat else _completion_reply)(result, body.model)
        return JSONResponse(reply, headers=shapes.routing_headers(result))
    first, rest = await calls.stream(request, job_id, kind, model)
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": FINGERPRINT,
    }

    def finish(reason: str) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {}, "finish_reason": reason}
        return {"text": "", "index": 0, "logprobs": None, "finish_reason": reason}

    usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse_stream(
        first,
        rest,
        head=head,
        choice=_chat_choice if chat else _text_choice,
        finish=finish,
        usage=usage,
    )
    return StreamingResponse(events, media_type=SSE, headers={"X-Corral-Job-Id": job_id})


# Endpoints ------------------------------------------------------------------------------


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request, who: CallerDep) -> Response:
    body.checked()
    if not body.messages:
        raise GatewayError(400, "[] is too short - 'messages'", param="messages")
    fields: dict[str, Any] = {
        "kind": "chat",
        "model": body.model,
        "messages": [_message(m) for m in body.messages],
        "options": body.options(body.max_completion_tokens or body.max_tokens),
    }
    if body.tools:
        fields["tools"] = body.tools
    if (fmt := _format(body.response_format)) is not None:
        fields["format"] = fmt
    if body.reasoning_effort in ("low", "medium", "high"):
        fields["think"] = body.reasoning_effort
    return await _complete(request, body, fields, who)


@router.post("/completions")
async def completions(body: CompletionBody, request: Request, who: CallerDep) -> Response:
    body.checked()
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise GatewayError(400, "send exactly one prompt per request", param="prompt")
        prompt = prompt[0]
    if body.echo:
        raise GatewayError(400, "echo is not supported by Corral", param="echo")
    fields: dict[str, Any] = {
        "kind": "generate",
        "model": body.model,
        "prompt": prompt,
        "options": body.options(body.max_tokens),
    }
    if body.suffix is not None:
        fields["suffix"] = body.suffix
    return await _complete(request, body, fields, who)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, what the openai client decodes
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/embeddings")
async def embeddings(body: EmbeddingBody, request: Request, who: CallerDep) -> Response:
    if not body.model:
        raise GatewayError(400, "model is required", param="model")
    if body.encoding_format not in ("float", "base64"):
        raise GatewayError(400, "encoding_format must be float or base64", param="encoding_format")
    texts = body.input
    if not isinstance(texts, str) and not all(isinstance(t, str) for t in texts):
        raise GatewayError(400, "token arrays are not supported: send text", param="input")
    fields: dict[str, Any] = {"kind": "embed", "model": body.model, "input": texts}
    if body.dimensions is not None:
        fields["dimensions"] = body.dimensions
    job_id = await calls.submit(
        request,
        fields | who.job_fields(),
        not_found=f'model "{body.model}" not found, try pulling it first',
    )
    result = await calls.wait(request, job_id, normalize_model(body.model))
    data = [
        {"object": "embedding", "embedding": _encode(vector, body.encoding_format), "index": i}
        for i, vector in enumerate(result.embeddings or [])
    ]
    reply = {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return JSONResponse(reply, headers=shapes.routing_headers(result))


def _model_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry["name"],
        "object": "model",
        "created": unix_time(entry.get("modified_at")),
        "owned_by": "library",
    }


@router.get("/models")
async def models(request: Request) -> Response:
    tags = await services(request).fleet.tags()
    return JSONResponse({"object": "list", "data": [_model_entry(m) for m in tags["models"]]})


@router.get("/models/{model:path}")
async def model(model: str, request: Request) -> Response:
    tags = await services(request).fleet.tags()
    for entry in tags["models"]:
        if entry["name"] == normalize_model(model):
            return JSONResponse(_model_entry(entry))
    raise GatewayError(404, f"model '{model}' not found", code="model_not_found", param="model")
