"""What the fleet serves and has loaded, in Ollama's shapes: /api/tags, /api/ps, /api/show.

The set of models comes from the fleet's registry in Redis (the same set ``infer`` validates
against); the details (size, digest, family...) and what is loaded come from the instances
themselves, asked concurrently with a short timeout, so one slow or dead server costs a
listing its details, never the listing.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from app.gateway.blocking import Blocking
from app.gateway.errors import GatewayError
from app.state.fleet import fleet_state

#: Seconds an instance has to answer a catalogue request.
ASK_TIMEOUT = 3.0


@dataclass(frozen=True)
class Instance:
    name: str
    url: str
    up: bool
    models: frozenset[str]


def fleet_instances() -> list[Instance]:
    """Every registered instance (blocking: Redis). URLs live in the registry hash."""
    fleet = fleet_state()
    snap = fleet.instances.snapshot()
    urls = fleet.instances.field([s.name for s in snap.instances], "url")
    return [
        Instance(s.name, url or "", s.enabled and s.up(snap.now), s.models)
        for s, url in zip(snap.instances, urls, strict=True)
    ]


def unix_time(stamp: str | None) -> int:
    """Ollama's RFC 3339 time (nanoseconds, any offset) as a Unix time; 0 if unreadable."""
    if not stamp:
        return 0
    try:
        return int(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp)).timestamp())
    except ValueError:
        return 0


class FleetInfo:
    def __init__(self, http: httpx.AsyncClient, blocking: Blocking) -> None:
        self.http = http
        self._blocking = blocking

    async def instances(self) -> list[Instance]:
        return await self._blocking(fleet_instances)

    async def _ask(self, inst: Instance, path: str) -> dict[str, Any] | None:
        try:
            reply = await self.http.get(inst.url + path, timeout=ASK_TIMEOUT)
            reply.raise_for_status()
            body: dict[str, Any] | None = reply.json()  # Ollama answers with an object
            return body
        except (httpx.HTTPError, ValueError):
            return None

    async def _ask_all(self, path: str) -> list[tuple[Instance, dict[str, Any]]]:
        live = [i for i in await self.instances() if i.up and i.url]
        replies = await asyncio.gather(*(self._ask(i, path) for i in live))
        return [(i, r) for i, r in zip(live, replies, strict=True) if r is not None]

    async def served(self) -> set[str]:
        return await self._blocking(lambda: fleet_state().instances.served_models())

    async def tags(self) -> dict[str, Any]:
        """``/api/tags`` for the fleet: each served model once, with an instance's details."""
        served = await self.served()
        details: dict[str, dict[str, Any]] = {}
        for _, reply in await self._ask_all("/api/tags"):
            for entry in reply.get("models", []):
                details.setdefault(entry.get("name", ""), entry)
        models = [
            details.get(name) or {"name": name, "model": name, "size": 0, "digest": ""}
            for name in sorted(served)
        ]
        return {"models": models}

    async def ps(self) -> dict[str, Any]:
        """``/api/ps`` for the fleet: one entry per model per instance it is loaded on."""
        entries = [
            {**entry, "instance": inst.name}
            for inst, reply in await self._ask_all("/api/ps")
            for entry in reply.get("models", [])
        ]
        entries.sort(key=lambda e: unix_time(e.get("expires_at")), reverse=True)
        return {"models": entries}

    async def version(self) -> str:
        """The Ollama version of an instance that answers (what clients check features by).

        One instance at a time: the endpoint needs no key, so it must not fan out.
        """
        for inst in await self.instances():
            if inst.up and inst.url:
                reply = await self._ask(inst, "/api/version")
                if reply and reply.get("version"):
                    version: str = reply["version"]
                    return version
        return "0.0.0"

    async def show(self, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Ollama's ``/api/show`` answer from an instance that serves ``model``."""
        serving = [i for i in await self.instances() if i.up and i.url and model in i.models]
        for inst in serving:
            try:
                reply = await self.http.post(inst.url + "/api/show", json=body, timeout=ASK_TIMEOUT)
                return reply.status_code, reply.json()
            except (httpx.HTTPError, ValueError):
                continue
        if serving:
            raise GatewayError(502, f"no instance serving {model} answered /api/show; retry")
        raise GatewayError(404, f"model '{model}' not found")
