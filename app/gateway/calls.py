"""One inference call as every API makes it: submit the job, then wait for it or stream it.

Errors leave as :class:`GatewayError` with the status the client should see; a client that
disconnects gets its job revoked wherever it is, queued, waiting or running (ClientGone ends
the request quietly; a stream abandoned after its first chunk is revoked by ``follow``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from app.errors import BrokerUnavailable, InvalidRequest, ModelNotServed, Overloaded, RateLimited
from app.gateway.disconnect import ClientGone, unless_gone
from app.gateway.errors import GatewayError, job_error
from app.gateway.services import Services, services
from app.gateway.streaming import follow, open_stream
from app.schemas import InferResult

log = logging.getLogger(__name__)

#: Seconds a client is told to wait before trying again when the broker did not take a job
#: (a broker node restarting, a network partition healing).
BROKER_RETRY_AFTER = "2"


async def submit(
    request: Request, fields: dict[str, Any], *, not_found: str, wait: bool = True
) -> str:
    """Publish the job; 400 with InvalidRequest's text, 404 ``not_found`` for an unknown model,
    503 when the broker does not take it (the client may retry: nothing waits for it here).

    With ``wait`` (the default), :func:`wait` or :func:`stream` must follow.
    """
    try:
        return await services(request).jobs.submit(fields, wait=wait)
    except ModelNotServed:
        raise GatewayError(404, not_found, code="model_not_found", param="model") from None
    except Overloaded as exc:
        retry = str(math.ceil(exc.retry_after))
        raise GatewayError(
            503, str(exc), code="overloaded", headers={"Retry-After": retry}
        ) from None
    except RateLimited as exc:
        retry = str(math.ceil(exc.retry_after))
        raise GatewayError(
            429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": retry}
        ) from None
    except InvalidRequest as exc:
        raise GatewayError(400, str(exc)) from None
    except BrokerUnavailable as exc:
        log.warning("job not submitted: %s", exc)
        raise GatewayError(
            503, str(exc), code="broker_unavailable", headers={"Retry-After": BROKER_RETRY_AFTER}
        ) from None


def _left(svc: Services, job_id: str, model: str) -> None:
    log.info("client left while job %s waited", job_id)
    svc.later(svc.jobs.cancel(job_id, model))


async def wait(request: Request, job_id: str, model: str) -> InferResult:
    """The job's result; its failure as a GatewayError (see ``errors.job_error``)."""
    svc = services(request)
    try:
        return await unless_gone(request, svc.jobs.result(job_id))
    except ClientGone:
        _left(svc, job_id, model)
        raise
    except GatewayError:
        raise
    except Exception as exc:
        raise job_error(exc) from exc


async def stream(
    request: Request, job_id: str, kind: str, model: str
) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
    """The job's first chunk (errors before it as a GatewayError) and the rest."""
    svc = services(request)
    try:
        return await open_stream(request, follow(svc.jobs, svc.relay, job_id, kind))
    except ClientGone:
        _left(svc, job_id, model)
        raise
