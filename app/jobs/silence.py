"""How long a call to Ollama may stay silent, learned per instance and model.

``request_timeout`` (300 s by default) has to allow a long prompt or the cold load of a big
model before the first token, so on its own it lets a hung server hold a job for minutes.
Every answer says what its time went to (``load_duration``, ``prompt_eval_count`` and
``prompt_eval_duration``), so each instance learns, per model, moving averages of:

* ``ttft``: the time to the first token beyond loading and prompt evaluation;
* ``pe``: prompt evaluation time per evaluated prompt token;
* ``gap``: the time between two streamed chunks.

Before the call only the prompt's characters are known, and Ollama may evaluate few of its
tokens (a prefix cached from the same conversation) or all of them: the bound takes all, at
the generous ``CHARS_PER_TOKEN``, so a long prompt arriving cold is never cut for it. A call
then may be silent, before its first token, ``factor x (ttft + pe x prompt tokens)``, plus
``load_factor x`` the learned load time when the model is not loaded there; between tokens
``factor x gap``; never less than the floor. A phase with nothing learned yet (a new instance
or model, a cold load whose time is unknown) is bounded by ``request_timeout`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.schemas import Answer, InferRequest
from app.settings import Settings

#: Characters per token when estimating a prompt's tokens from its text: on the low side
#: (English runs about 4), so the estimate, and the bound, err long.
CHARS_PER_TOKEN = 3.0


@dataclass(frozen=True)
class Budget:
    """Seconds of silence allowed before the first chunk and between chunks (None: no
    learned bound)."""

    first_s: float | None
    gap_s: float | None


def prompt_chars(request: InferRequest) -> int:
    """The size of what Ollama evaluates before the first token."""
    if request.kind == "chat":
        return sum(len(m.content) for m in request.messages or [])
    return len(request.prompt or "") + len(request.system or "") + len(request.suffix or "")


def budget(stats: dict[str, Any], chars: int, settings: Settings) -> Budget:
    """The bounds for one call, from ``Instances.silence_stats`` (``app.state.instances``)."""
    floor, k = settings.silence_floor_s, settings.silence_factor
    first: float | None = None
    if stats.get("ttft") is not None:
        tokens = chars / CHARS_PER_TOKEN
        first = max(floor, k * (stats["ttft"] + (stats.get("pe") or 0.0) * tokens))
        if not stats.get("loaded"):
            load = stats.get("load")
            first = None if load is None else first + settings.silence_load_factor * load
    gap = None if stats.get("gap") is None else max(floor, k * stats["gap"])
    return Budget(first, gap)


def samples(
    model: str, reply: Answer, first_s: float | None, gap_s: float | None
) -> dict[str, float]:
    """What one answer teaches (folded by ``Slots.finish``); {} for an embedding."""
    if first_s is None:
        return {}
    t = reply.timings
    learned = {f"ttft:{model}": max(0.0, first_s - t.load_s - t.prompt_eval_s)}
    if reply.prompt_tokens and t.prompt_eval_s > 0:
        learned[f"pe:{model}"] = t.prompt_eval_s / reply.prompt_tokens
    if gap_s is not None:
        learned[f"gap:{model}"] = gap_s
    return learned
