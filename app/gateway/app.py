"""The gateway's ASGI app: Ollama's API, OpenAI's API and the job API over one fleet.

Request path, outermost first: body limit (413) -> API key (401) -> bodies on Ollama's and
OpenAI's paths read as JSON whatever their Content-Type -> FastAPI routing, where
each endpoint resolves tier/priority/agent (400/403), validates its body (400), submits an
``infer`` job and waits for or streams it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from app.gateway import admin_api, dashboard, errors, jobs_api, native, openai_api
from app.gateway.auth import AuthMiddleware
from app.gateway.content_type import JsonBodyMiddleware
from app.gateway.disconnect import ClientGone
from app.gateway.limits import BodyLimitMiddleware
from app.gateway.services import Services
from app.observe import tracing
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: What a client that left is "answered" (nginx's code; nobody reads it, access logs do).
CLIENT_CLOSED = 499


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await Services.start(settings)
        if not settings.gateway_auth:
            log.warning("gateway auth is OFF (CORRAL_GATEWAY_AUTH=false): anyone can submit")
        try:
            yield
        finally:
            await app.state.services.close()

    app = FastAPI(
        title="Corral gateway",
        summary="Ollama's and OpenAI's APIs in front of a Corral fleet",
        lifespan=lifespan,
    )
    errors.install(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    app.include_router(native.router)
    app.include_router(openai_api.router)
    app.include_router(jobs_api.router)
    app.include_router(admin_api.router)
    app.include_router(dashboard.router)
    # add_middleware wraps what is there: the last added runs first.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(AuthMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.gateway_max_body_bytes)
    tracing.instrument_app(app)
    return app
