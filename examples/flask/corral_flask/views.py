"""Submit an ``infer`` job, and poll it by id.

``POST /jobs`` takes ``infer``'s keyword arguments as a JSON object and answers 202 with the
job id, or 400 with ``InvalidRequest``'s message (nothing is queued then).
``GET /jobs/<id>`` answers Celery's state of the job, with its ``InferResult`` once it
succeeded or its typed error once it failed.
"""

from typing import Any
from uuid import UUID

from celery import states
from flask import Blueprint, Response, jsonify, request

from app.errors import InvalidRequest
from app.schemas import InferResult
from tasks import infer
from tasks.infer import validate

jobs = Blueprint("jobs", __name__)


@jobs.post("/jobs")
def submit() -> tuple[Response, int]:
    fields = request.get_json(force=True, silent=True)
    if not isinstance(fields, dict):
        return jsonify(error="the body must be a JSON object of infer's fields"), 400
    try:
        # infer.delay() validates too, but it takes a `_route` field as a job already
        # accepted (Corral's own bookkeeping): validate() refuses it from a client.
        validate(fields)
        job = infer.delay(**fields)
    except InvalidRequest as exc:
        return jsonify(error=str(exc)), 400
    return jsonify(id=job.id), 202


# A job id is a UUID: anything else is a 404 here, before Celery is asked.
@jobs.get("/jobs/<uuid:job_id>")
def poll(job_id: UUID) -> Response:
    return jsonify(job_view(str(job_id)))


def job_view(job_id: str) -> dict[str, Any]:
    """Celery's state of the job, and its result or error once it has one.

    An id that was never submitted is PENDING too: Celery cannot tell it from a queued job.
    """
    job = infer.AsyncResult(job_id)
    state = job.state
    view: dict[str, Any] = {"id": job_id, "state": state}
    if state == states.SUCCESS:
        view["result"] = InferResult.model_validate(job.result).model_dump(mode="json")
    elif state in states.PROPAGATE_STATES:
        error = job.result  # rebuilt as its own class: RetriesExhausted, JobRejected...
        view["error"] = {
            "type": type(error).__name__,
            "message": str(error),
            "history": getattr(error, "history", []),
        }
    return view
