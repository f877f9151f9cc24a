"""Idempotency keys: a caller's own key for a job, bound to the first job submitted with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import redis

from app.state import keys
from app.state.scripts import script


class JobKeys:
    """``infer.delay(job_key=...)``: the same key within ``ttl`` gives back the first job."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis, self.ns = client, ns

    def claim(self, wanted: Sequence[tuple[str, str]], ttl: float) -> list[str | None]:
        """Bind each ``(key, job)`` for ``ttl`` seconds, in order; for each, the earlier job's
        id if its key was bound (by an earlier call, or earlier in ``wanted``), else None.
        One round trip for the lot (a bulk call's keys)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key, job in wanted:
                name = keys.job_key(self.ns, key)
                pipe.set(name, job, nx=True, ex=max(1, int(ttl)))
                pipe.get(name)
            replies = pipe.execute()
        # The client decodes responses: GET gives the job the key is bound to now.
        return [
            None if bound else cast("str | None", first)
            for bound, first in zip(replies[::2], replies[1::2], strict=True)
        ]

    def release(self, bound: Sequence[tuple[str, str]]) -> int:
        """Unbind each ``(key, job)`` still bound to that job (its publish failed); how many
        were. One round trip."""
        names = [keys.job_key(self.ns, key) for key, _ in bound]
        released = script(self.redis, "release_keys.lua")(keys=names, args=[j for _, j in bound])
        return int(released)
