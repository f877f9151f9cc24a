"""Ollama's own API: what the official ``ollama`` client and every Ollama integration call.

Bodies are read as Ollama reads them (unknown fields ignored, ``stream`` true unless told
otherwise); the error statuses and texts are Ollama's (``model '' not found`` with 404 for
generate, ``model is required`` with 400 elsewhere, ...). Each inference request is one
``infer`` job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from app.gateway import calls, shapes
from app.gateway.auth import Caller, CallerDep
from app.gateway.errors import GatewayError
from app.gateway.services import services
from app.gateway.streaming import stream_error
from app.observe import metrics
from app.options import split_options
from app.settings import normalize_model

log = logging.getLogger(__name__)

router = APIRouter()

NDJSON = "application/x-ndjson"


class _Body(BaseModel):
    # Ollama (Go's encoding/json) ignores fields it does not know, and so do we; the fields
    # it knows are typed strictly, as Go would refuse a string where a bool belongs.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    def infer_fields(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, **self.model_dump(exclude_none=True, exclude={"stream"})}


class GenerateBody(_Body):
    prompt: str = ""  # empty: Ollama only loads the model
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    stream: bool = True


class ChatBody(_Body):
    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    stream: bool = True

    def infer_fields(self, kind: str) -> dict[str, Any]:
        fields = super().infer_fields(kind)
        # Ollama lower-cases roles ("User" works there).
        fields["messages"] = [
            {**m, "role": m["role"].lower()} if isinstance(m.get("role"), str) else m
            for m in self.messages
        ]
        return fields


class EmbedBody(_Body):
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None


class EmbeddingsBody(_Body):
    prompt: str = ""


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    name: str = ""  # the field's old name, still accepted by Ollama
    verbose: bool | None = None


def _without_ignored_options(request: Request, fields: dict[str, Any]) -> dict[str, Any]:
    """The job's fields with only the options Ollama reads.

    Ollama ignores an option it does not know (logging it as invalid), and clients built on
    its API rely on that: LangChain still sends ``tfs_z`` and ``mirostat``. So does the
    gateway: such an option is dropped, with a warning naming it and a count in
    ``corral_ignored_options_total``. One sent as null is only "not set": dropped quietly.
    """
    options = fields.get("options")
    if not options:
        return fields
    known, ignored = split_options(options)
    named = sorted(name for name, value in ignored.items() if value is not None)
    if named:
        log.warning(
            "%s: ignoring options Ollama does not use: %s (as Ollama does)",
            request.url.path,
            ", ".join(named),
        )
        svc = services(request)
        svc.later(svc.jobs.blocking(metrics.ignored_options, named))
    return fields | {"options": known}


def _ndjson(chunk: dict[str, Any]) -> bytes:
    return json.dumps(chunk, separators=(",", ":")).encode() + b"\n"


async def _ndjson_stream(
    first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[bytes]:
    yield _ndjson(first)
    try:
        async for chunk in rest:
            yield _ndjson(chunk)
    except Exception as exc:  # after the first line the status is sent: Ollama's error line
        yield _ndjson({"error": stream_error(exc).message})


async def _complete(
    request: Request, kind: str, body: GenerateBody | ChatBody, who: Caller
) -> Response:
    fields = _without_ignored_options(request, body.infer_fields(kind))
    fields |= who.job_fields() | {"stream": body.stream}
    job_id = await calls.submit(request, fields, not_found=f"model '{body.model}' not found")
    model = normalize_model(body.model)
    if body.stream:
        first, rest = await calls.stream(request, job_id, kind, model)
        return StreamingResponse(
            _ndjson_stream(first, rest), media_type=NDJSON, headers={"X-Corral-Job-Id": job_id}
        )
    result = await calls.wait(request, job_id, model)
    return JSONResponse(shapes.completion(result), headers=shapes.routing_headers(result))


@router.post("/api/generate")
async def generate(body: GenerateBody, request: Request, who: CallerDep) -> Response:
    if not body.model:  # Ollama's generate has no "model is required" check
        raise GatewayError(404, "model '' not found")
    return await _complete(request, "generate", body, who)


@router.post("/api/chat")
async def chat(body: ChatBody, request: Request, who: CallerDep) -> Response:
    if not body.model:
        raise GatewayError(400, "model is required")
    return await _complete(request, "chat", body, who)


def _embed_not_found(model: str) -> str:
    return f'model "{model}" not found, try pulling it first'


@router.post("/api/embed")
async def embed(body: EmbedBody, request: Request, who: CallerDep) -> Response:
    if not body.model:
        raise GatewayError(400, "model is required")
    fields = _without_ignored_options(request, body.infer_fields("embed")) | who.job_fields()
    job_id = await calls.submit(request, fields, not_found=_embed_not_found(body.model))
    result = await calls.wait(request, job_id, normalize_model(body.model))
    return JSONResponse(shapes.embed(result), headers=shapes.routing_headers(result))


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request, who: CallerDep) -> Response:
    """The legacy endpoint: one prompt, one vector (normalised, unlike Ollama's here)."""
    if not body.model:
        raise GatewayError(400, "model is required")
    if not body.prompt:  # Ollama answers an empty prompt with an empty vector
        if normalize_model(body.model) not in await services(request).fleet.served():
            raise GatewayError(404, _embed_not_found(body.model))
        return JSONResponse({"embedding": []})
    fields = _without_ignored_options(
        request,
        {
            "kind": "embed",
            "input": body.prompt,
            **body.model_dump(exclude_none=True, exclude={"prompt"}),
        },
    )
    fields |= who.job_fields()
    job_id = await calls.submit(request, fields, not_found=_embed_not_found(body.model))
    result = await calls.wait(request, job_id, normalize_model(body.model))
    vectors = result.embeddings or [[]]
    return JSONResponse({"embedding": vectors[0]}, headers=shapes.routing_headers(result))


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> Response:
    return PlainTextResponse("Ollama is running")


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version(request: Request) -> Response:
    return JSONResponse({"version": await services(request).fleet.version()})


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> Response:
    return JSONResponse(await services(request).fleet.tags())


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    """What is loaded where: Ollama's entries, one per instance, each naming its instance."""
    return JSONResponse(await services(request).fleet.ps())


@router.post("/api/show")
async def show(body: ShowBody, request: Request) -> Response:
    name = body.model or body.name
    if not name:
        raise GatewayError(400, "model is required")
    model = normalize_model(name)
    forwarded = body.model_dump(exclude_none=True, exclude={"name"}) | {"model": model}
    status, reply = await services(request).fleet.show(model, forwarded)
    return JSONResponse(reply, status_code=status)


def _not_here(action: str) -> Any:
    async def refuse() -> Response:
        raise GatewayError(
            501,
            f"the Corral gateway does not manage models ({action}): pull, create or delete them"
            " on each Ollama server (ollama pull/create/rm there); the fleet sees the change at"
            " its next heartbeat",
        )

    return refuse


# The models live on the instances: these Ollama endpoints say so instead of a bare 404.
for _action, _method in (
    ("pull", "POST"),
    ("push", "POST"),
    ("create", "POST"),
    ("copy", "POST"),
    ("delete", "DELETE"),
):
    router.add_api_route(
        f"/api/{_action}", _not_here(_action), methods=[_method], include_in_schema=False
    )
