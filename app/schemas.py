"""What a job is: the request an agent sends and the result it gets back.

Both are pydantic models. The request is validated in the caller's process before anything
is published, so a bad request never reaches a queue.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from app.options import Number, Options
from app.settings import Tier, get_settings, normalize_model

Kind = Literal["generate", "chat", "embed"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    images: list[StrictStr] | None = None
    tool_calls: list[dict[str, Any]] | None = None


#: Fields that are Corral's, not Ollama's: never sent to Ollama, never part of the cache key.
CORRAL_FIELDS = frozenset(
    {"kind", "tier", "priority", "agent", "agent_class", "cache", "stream", "job_key"}
)

_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "generate": ("prompt", "suffix", "system", "template", "raw", "images", "context"),
    "chat": ("messages", "tools"),
    "embed": ("input", "truncate", "dimensions"),
}


class InferRequest(BaseModel):
    """One inference call. ``infer.delay(**fields)`` takes exactly these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = "generate"
    model: StrictStr = Field(min_length=1, max_length=200)
    # generate
    prompt: StrictStr | None = None
    suffix: StrictStr | None = None
    system: StrictStr | None = None
    template: StrictStr | None = None
    raw: StrictBool | None = None
    images: list[StrictStr] | None = None
    context: list[StrictInt] | None = None
    # chat
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    # embed
    input: StrictStr | list[StrictStr] | None = None
    truncate: StrictBool | None = None
    dimensions: StrictInt | None = Field(None, gt=0)
    # all kinds
    options: Options | None = None
    format: Literal["json"] | dict[str, Any] | None = None
    keep_alive: StrictStr | Number | None = None
    think: StrictBool | Literal["low", "medium", "high"] | None = None
    # Corral's own
    tier: Tier = Field(default_factory=lambda: get_settings().default_tier)
    priority: StrictInt = Field(5, ge=0, le=9, description="order inside the tier, 9 first")
    agent: StrictStr | None = Field(None, max_length=128)
    agent_class: StrictStr | None = Field(
        None, max_length=64, description="rate-limit class; default: from the agent's name"
    )
    cache: StrictBool = Field(True, description="False bypasses the response cache")
    stream: StrictBool = Field(
        False, description="relay tokens as they come (app.jobs.relay), e.g. for the gateway"
    )
    job_key: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="idempotency key: resubmitting it returns the first job instead of a new one",
    )

    @field_validator("model")
    @classmethod
    def _normalize_model(cls, model: str) -> str:
        return normalize_model(model)

    @model_validator(mode="after")
    def _fields_match_kind(self) -> InferRequest:
        required = {"generate": "prompt", "chat": "messages", "embed": "input"}[self.kind]
        if getattr(self, required) is None:
            raise ValueError(f"kind={self.kind!r} needs {required!r}")
        if self.kind == "chat" and not self.messages:
            raise ValueError("kind='chat' needs at least one message")
        for kind, fields in _KIND_FIELDS.items():
            if kind == self.kind:
                continue
            stray = [f for f in fields if getattr(self, f) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} not allowed with kind={self.kind!r}")
        return self

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: embeddings always; text at temperature 0 or a fixed seed."""
        if self.kind == "embed":
            return True
        opts = self.options
        return opts is not None and (
            opts.temperature == 0 or (opts.seed is not None and opts.seed >= 0)
        )

    def ollama_body(self, *, stream: bool) -> dict[str, Any]:
        """The JSON body for Ollama's native endpoint of this kind."""
        body = self.model_dump(exclude_none=True, exclude=set(CORRAL_FIELDS))
        if self.kind != "embed":
            body["stream"] = stream
        return body

    @property
    def inputs(self) -> list[str]:
        """An embed request's inputs as a list (one string is one input)."""
        if self.input is None:
            return []
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def batch_key(self) -> str:
        """What embed requests must share to go in one ``/api/embed`` call: every field sent to
        Ollama but the inputs (the model, truncate, dimensions, options, keep_alive)."""
        body = self.model_dump(exclude_none=True, exclude=set(CORRAL_FIELDS) | {"input"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def cache_key(self) -> str:
        """Canonical hash of what determines the answer (not tier, agent or keep_alive)."""
        semantic = self.model_dump(
            exclude_none=True, exclude=set(CORRAL_FIELDS - {"kind"}) | {"keep_alive"}
        )
        canonical = json.dumps(semantic, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class Timings(BaseModel):
    total_s: float = 0.0
    load_s: float = 0.0
    prompt_eval_s: float = 0.0
    eval_s: float = 0.0


class RoutingInfo(BaseModel):
    """Where and how the job ran."""

    instance: str | None = None
    queue: str | None = None
    attempts: int = 0
    wait_s: float = 0.0
    service_s: float = 0.0
    finished_at: float = 0.0
    cache_hit: bool = False
    strategy: str | None = None
    score: dict[str, float] = Field(default_factory=dict)
    excluded: list[str] = Field(default_factory=list)
    #: Embed jobs answered by the same /api/embed call as this one (1: a call of its own).
    batch_size: int = 1
    #: The job whose slot that call used (None: a call of its own).
    batch_leader: str | None = None


class Answer(BaseModel):
    """What Ollama answered, in one shape for every kind."""

    text: str | None = None
    message: dict[str, Any] | None = None
    embeddings: list[list[float]] | None = None
    done_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings = Field(default_factory=Timings)


class InferResult(Answer):
    """What ``infer.delay(...).get()`` returns: the answer, and where and how it ran."""

    id: str
    kind: Kind
    model: str
    routing: RoutingInfo = Field(default_factory=RoutingInfo)

    @property
    def cached(self) -> bool:
        return self.routing.cache_hit


class RouteState(BaseModel):
    """Corral's bookkeeping, carried in the job message as the ``_route`` keyword.

    ``instance`` is None while the job waits for a slot (router stage) and names the
    instance once a slot is held (execution stage).
    """

    submitted_at: float
    #: Set when a rate limit made the job wait: it may start from this time on.
    start_after: float | None = None
    #: Its priority inside the tier once lowered for fairness (``app.policy.fairness``).
    priority: int | None = None

    def queue_priority(self, request: InferRequest) -> int:
        """The priority the job waits with in its tier's queue and among the waiters."""
        return request.priority if self.priority is None else self.priority

    instance: str | None = None
    attempts: int = 0
    excluded: list[str] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)
    routed_at: float | None = None
    strategy: str | None = None
    score: dict[str, float] = Field(default_factory=dict)
    #: Back from a batched embed call that failed: run alone from now on, so one bad input
    #: never fails a neighbour's job (``app.jobs.embed_batch``).
    alone: bool = False
