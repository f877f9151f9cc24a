"""The job API, for apps that do not want to hold a connection open while a job waits.

``POST /jobs`` takes exactly ``infer``'s fields and answers at once with the job id;
``GET /jobs/{id}`` says where the job is and gives its result or error; ``DELETE /jobs/{id}``
revokes it wherever it is (queued, waiting for a slot, or running: its call is closed). A job
is visible only to the agent that submitted it (another key gets 404, as for a job that does
not exist).
"""

from __future__ import annotations

import time
from typing import Any, Literal, cast

from celery import states
from celery.exceptions import TaskRevokedError
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from app.errors import JobFailed
from app.gateway import calls
from app.gateway.auth import Caller, CallerDep, resolve
from app.gateway.errors import GatewayError
from app.gateway.jobs import outcome, place
from app.gateway.services import Services, services
from app.schemas import InferRequest, InferResult
from app.state import keys as state_keys

router = APIRouter(prefix="/jobs")

State = Literal[
    "queued", "waiting_for_slot", "running", "retrying", "succeeded", "failed", "revoked"
]
FINISHED = frozenset({"succeeded", "failed", "revoked"})


class JobError(BaseModel):
    type: str
    message: str
    history: list[dict[str, Any]] = []


class JobView(BaseModel):
    id: str
    state: State
    model: str
    kind: str
    tier: str
    agent: str | None = None
    submitted_at: float
    result: InferResult | None = None
    error: JobError | None = None


def _record_key(svc: Services, job_id: str) -> str:
    return state_keys.gateway_job(svc.settings.namespace, job_id)


async def _record(request: Request, job_id: str, who: Caller) -> dict[str, str]:
    """The job's record; 404 if there is none or it belongs to another agent."""
    svc = services(request)
    # The client decodes responses (redis-py types a reply as bytes or str).
    record = cast(dict[str, str], await svc.redis.hgetall(_record_key(svc, job_id)))
    if not record or (who.key is not None and record.get("owner") != who.key.agent):
        raise GatewayError(404, f"no job {job_id} submitted through this gateway by you")
    return record


async def _view(request: Request, job_id: str, record: dict[str, str]) -> JobView:
    svc = services(request)
    view = JobView(
        id=job_id,
        state="queued",
        model=record["model"],
        kind=record["kind"],
        tier=record["tier"],
        agent=record.get("owner") or None,
        submitted_at=float(record["submitted_at"]),
    )
    meta = await svc.results.peek(job_id)
    if meta is not None and meta["status"] in states.READY_STATES:
        try:
            view.result, view.state = outcome(meta), "succeeded"
        except TaskRevokedError:
            view.state = "revoked"
        except Exception as exc:
            view.state = "failed"
            history = exc.history if isinstance(exc, JobFailed) else []
            view.error = JobError(type=type(exc).__name__, message=str(exc), history=history)
        return view
    if record.get("revoked"):
        view.state = "revoked"
        return view
    where = await svc.jobs.blocking(place, job_id, record["model"])
    retrying = meta is not None and meta["status"] == states.RETRY
    view.state = "retrying" if where == "queued" and retrying else where
    return view


@router.post("", status_code=202)
async def submit(body: InferRequest, request: Request, who: CallerDep) -> Response:
    """Body: ``infer``'s keyword arguments (``kind``, ``model``, ``prompt``, ``tier``...)."""
    if body.stream:
        raise GatewayError(
            400,
            "stream is not available through /jobs: use /api/generate,"
            " /api/chat or /v1/chat/completions to stream",
        )
    sent = body.model_fields_set
    caller = resolve(
        who.key,
        tier=body.tier if "tier" in sent else request.headers.get("x-corral-tier"),
        priority=body.priority if "priority" in sent else who.priority,
        agent=body.agent if "agent" in sent else who.agent,
    )
    fields = body.model_dump(mode="json", exclude_none=True) | caller.job_fields()
    job_id = await calls.submit(
        request, fields, not_found=f"model '{body.model}' not found", wait=False
    )
    svc = services(request)
    key = _record_key(svc, job_id)
    async with svc.redis.pipeline(transaction=False) as pipe:
        pipe.hset(
            key,
            mapping={
                "owner": caller.agent or "",
                "model": body.model,
                "kind": body.kind,
                "tier": caller.tier,
                "submitted_at": time.time(),
            },
        )
        pipe.expire(key, svc.settings.result_expires)
        await pipe.execute()
    return JSONResponse({"id": job_id, "state": "queued"}, status_code=202)


@router.get("/{job_id}", response_model=JobView)
async def get(job_id: str, request: Request, who: CallerDep) -> JobView:
    return await _view(request, job_id, await _record(request, job_id, who))


@router.delete("/{job_id}")
async def revoke(job_id: str, request: Request, who: CallerDep) -> Response:
    """Revoke an unfinished job (200, with where it was); 409 once it ended."""
    record = await _record(request, job_id, who)
    view = await _view(request, job_id, record)
    if view.state in FINISHED:
        raise GatewayError(409, f"job {job_id} already ended: {view.state}")
    svc = services(request)
    where = await svc.jobs.cancel(job_id, record["model"])
    await svc.redis.hset(_record_key(svc, job_id), "revoked", "1")
    return JSONResponse({"id": job_id, "state": "revoked", "was": where})
