"""Idempotency keys: a caller's own key for a job, bound to the first job submitted with it."""

from __future__ import annotations

from typing import cast

import redis

from app.state import keys


class JobKeys:
    """``infer.delay(job_key=...)``: the same key within ``ttl`` gives back the first job."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis, self.ns = client, ns

    def claim(self, key: str, job: str, ttl: float) -> str | None:
        """Bind ``key`` to ``job`` for ``ttl`` seconds; the earlier job's id if it was bound."""
        name = keys.job_key(self.ns, key)
        if self.redis.set(name, job, nx=True, ex=max(1, int(ttl))):
            return None
        return cast("str | None", self.redis.get(name))  # the client decodes responses
