"""Ollama's JSON answers, built from an :class:`~app.schemas.InferResult`.

Field order follows Ollama's Go structs (``api/types.go``); durations are integer
nanoseconds and ``created_at`` is RFC 3339 in UTC, as Ollama sends them. The timings are the
instance's own (what Ollama reported for the attempt that succeeded); Corral's queueing and
routing time is in ``routing``, not in ``total_duration``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.schemas import InferResult

_NS = 1_000_000_000


def created_at(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


def metrics(result: InferResult) -> dict[str, int]:
    t = result.timings
    return {
        "total_duration": _ns(t.total_s),
        "load_duration": _ns(t.load_s),
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": _ns(t.prompt_eval_s),
        "eval_count": result.completion_tokens,
        "eval_duration": _ns(t.eval_s),
    }


def message(result: InferResult) -> dict[str, Any]:
    return {**(result.message or {}), "role": "assistant", "content": result.text or ""}


def completion(result: InferResult) -> dict[str, Any]:
    """``/api/generate`` or ``/api/chat`` with ``stream: false`` (also a stream's last line)."""
    reply: dict[str, Any] = {
        "model": result.model,
        "created_at": created_at(result.routing.finished_at),
    }
    if result.kind == "chat":
        reply["message"] = message(result)
    else:
        reply["response"] = result.text or ""
    reply["done"] = True
    reply["done_reason"] = result.done_reason or "stop"
    return reply | metrics(result)


def embed(result: InferResult) -> dict[str, Any]:
    """``/api/embed``."""
    t = result.timings
    return {
        "model": result.model,
        "embeddings": result.embeddings or [],
        "total_duration": _ns(t.total_s),
        "load_duration": _ns(t.load_s),
        "prompt_eval_count": result.prompt_tokens,
    }


def routing_headers(result: InferResult) -> dict[str, str]:
    """Where the job ran, for operators; clients that do not know them ignore them."""
    routing = result.routing
    return {
        "X-Corral-Job-Id": result.id,
        "X-Corral-Instance": routing.instance or "",
        "X-Corral-Attempts": str(routing.attempts),
        "X-Corral-Cache": "hit" if routing.cache_hit else "miss",
    }
