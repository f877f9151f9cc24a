"""Who is calling, and with which tier, priority and agent name.

``Authorization: Bearer <key>`` (how the ollama client sends ``OLLAMA_API_KEY`` and the
openai client its ``api_key``) names an API key; the key says which agent calls, the tiers
it may use and its default tier. ``X-Corral-Tier`` and ``X-Corral-Priority`` choose within
what the key allows. With auth on, the agent name is the key's (an ``X-Corral-Agent`` header
cannot impersonate another agent); with ``CORRAL_GATEWAY_AUTH=false`` it comes from the
header.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.gateway.api_keys import KeyInfo, KeyStore
from app.gateway.blocking import Blocking
from app.gateway.errors import GatewayError, error_response
from app.settings import TIERS, Tier, get_settings

#: Paths that answer without a key: the health checks load balancers and clients probe, and
#: the dashboard's page (it holds no data; its data path needs a key).
PUBLIC_PATHS = frozenset({"/", "/api/version", "/dashboard"})
#: Entries a key cache keeps before it starts over (bounds memory under a key-guessing flood).
CACHE_LIMIT = 10_000


class KeyCache:
    """Key look-ups, each result (a hit or a miss) reused for ``ttl`` seconds."""

    def __init__(self, store: KeyStore, ttl: float, blocking: Blocking) -> None:
        self.store, self.ttl, self._blocking = store, ttl, blocking
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}

    async def lookup(self, key: str) -> KeyInfo | None:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = await self._blocking(self.store.lookup, key)
        if len(self._entries) >= CACHE_LIMIT:
            self._entries.clear()
        self._entries[key] = (now + self.ttl, info)
        return info


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class AuthMiddleware:
    """Rejects requests without a live key (401) before their body is even read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        services = scope["app"].state.services
        if services.keys is not None:
            token = _bearer(scope)
            info = await services.keys.lookup(token) if token else None
            if info is None:
                problem = "invalid or revoked API key" if token else "missing API key"
                error = GatewayError(
                    401,
                    f"{problem}: send Authorization: Bearer <key>"
                    " (create one with `corral keys add`)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(scope["path"], error)(scope, receive, send)
                return
            scope.setdefault("state", {})["key"] = info
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Caller:
    """What every job of this request is submitted with."""

    key: KeyInfo | None
    tier: Tier
    priority: int
    agent: str | None

    def job_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"tier": self.tier, "priority": self.priority}
        if self.agent:
            fields["agent"] = self.agent
        if self.key is not None:  # the key's class sets the rate limits, not the request
            fields["agent_class"] = self.key.agent_class
        return fields


def resolve(
    key: KeyInfo | None,
    *,
    tier: str | None = None,
    priority: int | str | None = None,
    agent: str | None = None,
) -> Caller:
    """Tier, priority and agent from the key and the caller's choices; 400/403 if not allowed."""
    if tier is not None and tier not in get_args(Tier):
        raise GatewayError(400, f"unknown tier {tier!r}: use one of {', '.join(TIERS)}")
    default = key.default_tier if key else get_settings().default_tier
    chosen: Tier = tier or default  # type: ignore[assignment]
    if key is not None and chosen not in key.tiers:
        raise GatewayError(
            403,
            f"API key {key.prefix}... (agent {key.agent}) may not use tier {chosen!r};"
            f" it may use: {', '.join(key.tiers)}",
            code="tier_not_allowed",
        )
    try:
        level = 5 if priority is None else int(priority)
    except ValueError:
        level = -1
    if not 0 <= level <= 9:
        raise GatewayError(400, f"priority must be an integer 0-9 (9 first), not {priority!r}")
    return Caller(key, chosen, level, key.agent if key else agent)


async def caller(request: Request) -> Caller:
    """FastAPI dependency: the caller from the key and the X-Corral-* headers."""
    headers = request.headers
    return resolve(
        getattr(request.state, "key", None),
        tier=headers.get("x-corral-tier"),
        priority=headers.get("x-corral-priority"),
        agent=headers.get("x-corral-agent"),
    )


#: Endpoint parameter type: ``who: CallerDep``.
CallerDep = Annotated[Caller, Depends(caller)]
