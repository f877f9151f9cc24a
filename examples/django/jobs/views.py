"""Submit an ``infer`` job, and poll it by id.

``POST /jobs`` takes ``infer``'s keyword arguments as a JSON object and answers 202 with the
job id, or 400 with ``InvalidRequest``'s message (nothing is queued then).
``GET /jobs/<id>`` answers Celery's state of the job, with its ``InferResult`` once it
succeeded or its typed error once it failed.
"""

import json
from typing import Any
from uuid import UUID

from celery import states
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from app.errors import InvalidRequest
from app.schemas import InferResult
from tasks import infer
from tasks.infer import validate

NOT_AN_OBJECT = "the body must be a JSON object of infer's fields"


@csrf_exempt  # an API for programs, with no cookies: there is no session to forge requests in
@require_POST
def submit(request: HttpRequest) -> JsonResponse:
    try:
        fields = json.loads(request.body)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        return JsonResponse({"error": NOT_AN_OBJECT}, status=400)
    try:
        # infer.delay() validates too, but it takes a `_route` field as a job already
        # accepted (Corral's own bookkeeping): validate() refuses it from a client.
        validate(fields)
        job = infer.delay(**fields)
    except InvalidRequest as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"id": job.id}, status=202)


@require_GET
def poll(request: HttpRequest, job_id: UUID) -> JsonResponse:
    return JsonResponse(job_view(str(job_id)))


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
