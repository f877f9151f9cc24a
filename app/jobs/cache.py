"""The response cache, with single flight.

Only deterministic requests are cached (embeddings; text at temperature 0 or with a fixed
seed). When identical requests are in flight together, the first computes and the others
wait for its answer instead of taking slots of their own.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.client import Pipeline

from app.settings import get_settings
from app.state import keys
from app.state.client import redis_client
from app.state.scripts import script

#: How often a waiting duplicate looks for the leader's answer.
POLL_SECONDS = 0.05


@dataclass
class ResponseCache:
    redis: redis.Redis
    ns: str
    ttl: int

    def _key(self, digest: str) -> str:
        return keys.cache(self.ns, digest)

    def _flight(self, digest: str) -> str:
        return keys.cache_flight(self.ns, digest)

    def get(self, digest: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._key(digest))
        return json.loads(raw) if raw else None

    def put(self, digest: str, result: dict[str, Any], job: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self._key(digest), json.dumps(result), ex=self.ttl)
            self._release(pipe, digest, job)
            pipe.execute()

    def claim(self, digest: str, job: str, seconds: float) -> str:
        """Become the job that computes this answer; returns the job that holds the claim."""
        key = self._flight(digest)
        if self.redis.set(key, job, nx=True, ex=max(int(seconds), 1)):
            return job
        holder = cast(str | None, self.redis.get(key))  # the client decodes responses
        return holder or self.claim(digest, job, seconds)

    def release(self, digest: str, job: str) -> None:
        with self.redis.pipeline() as pipe:
            self._release(pipe, digest, job)
            pipe.execute()

    def _release(self, pipe: Pipeline, digest: str, job: str) -> None:
        # Only the holder may drop the claim; a compare-and-delete in one round trip.
        script(self.redis, "release_claim.lua")(
            keys=[self._flight(digest)], args=[job], client=pipe
        )

    def wait_for_leader(self, digest: str, deadline: float) -> dict[str, Any] | None:
        """Wait while another job computes the answer; None if it gave up or time ran out."""
        flight = self._flight(digest)
        while time.time() < deadline:
            hit = self.get(digest)
            if hit is not None:
                return hit
            if not self.redis.exists(flight):
                return self.get(digest)
            time.sleep(POLL_SECONDS)
        return None


def response_cache() -> ResponseCache:
    s = get_settings()
    return ResponseCache(redis_client(s.redis_url), s.namespace, s.cache_ttl)
