"""The placement plan as last made by a router, kept for people to see.

Each router process plans for itself (``app.jobs.placement``) and routes by its own plan; the
copy here only shows the plan (the dashboard, ``corral fleet list``). It expires if no router
made one for a while, so a stale plan is never shown as current.
"""

from __future__ import annotations

import json
from typing import cast

import redis

from app.state import keys


class PlacementShown:
    """``publish`` the models each instance should hold; ``read`` them back (None: no plan)."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis, self.key = client, keys.placement(ns)

    def publish(self, hold: dict[str, list[str]], ttl_s: float) -> None:
        self.redis.set(self.key, json.dumps(hold, sort_keys=True), px=max(1, int(ttl_s * 1000)))

    def read(self) -> dict[str, list[str]] | None:
        raw = cast("str | None", self.redis.get(self.key))  # the client decodes responses
        return None if raw is None else cast(dict[str, list[str]], json.loads(raw))
