"""Errors as each API spells them, and the HTTP status of every way a job can end badly.

Ollama's native API answers ``{"error": "<text>"}``; OpenAI's answers
``{"error": {"message", "type", "param", "code"}}``. Which one a client gets depends only on
the path (``/v1/...`` is OpenAI's), so middlewares and handlers share :func:`error_response`.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import TaskRevokedError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from app.errors import JobFailed, JobRejected, RetriesExhausted

_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error the client should see, with its status; ``code`` and ``param`` are OpenAI's."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(
    path: str, status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    if not is_openai(path):
        return {"error": message}
    kind = _OPENAI_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(path: str, error: GatewayError) -> JSONResponse:
    body = error_body(path, error.status, error.message, code=error.code, param=error.param)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def job_error(exc: BaseException) -> GatewayError:
    """How a job that ended without a result reaches the client.

    * ``RetriesExhausted`` (every attempt failed transiently): 502 Bad Gateway.
    * ``JobRejected`` (Ollama refused the request with a 4xx): that 4xx, so a client sees the
      same status as from Ollama itself (e.g. 400 for ``think`` on a model without it);
      502 when no instance answered (the model stopped being served mid-way).
    * revoked (``DELETE /jobs/{id}``, ``AsyncResult.revoke()``, Flower): 409.
    """
    if isinstance(exc, JobRejected):
        statuses = [h.get("status") for h in exc.history if h.get("status")]
        last = statuses[-1] if statuses else None
        status = last if isinstance(last, int) and 400 <= last < 500 else 502
        return GatewayError(status, exc.message, code="job_rejected")
    if isinstance(exc, RetriesExhausted):
        return GatewayError(502, exc.message, code="retries_exhausted")
    if isinstance(exc, TaskRevokedError):
        return GatewayError(
            409,
            "the job was revoked (DELETE /jobs/{id}, AsyncResult.revoke() or Flower)",
            code="job_revoked",
        )
    if isinstance(exc, JobFailed):
        return GatewayError(502, exc.message, code="job_failed")
    return GatewayError(502, f"the job failed: {type(exc).__name__}: {exc}", code="job_failed")


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's body errors in the words of ``InvalidRequest``: field path, then the problem."""
    errors = exc.errors()
    for e in errors:
        if e["type"] == "json_invalid":
            return f"invalid JSON: {e.get('ctx', {}).get('error', e['msg'])}"
        if e["type"] == "missing" and tuple(e["loc"]) == ("body",):
            return "missing request body"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'request'}: {e['msg']}"
        for e in errors
    )
    return f"invalid request: {problems}"


def install(app: FastAPI) -> None:
    """Every error leaves the gateway in the shape of the API it was asked on."""

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> Response:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.url.path, GatewayError(400, validation_message(exc)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if not is_openai(path) and exc.status_code in (404, 405):
            # What Ollama's router (gin) answers for an unknown path or method.
            text = "404 page not found" if exc.status_code == 404 else "405 method not allowed"
            return PlainTextResponse(text, status_code=exc.status_code)
        return error_response(path, GatewayError(exc.status_code, str(exc.detail)))
