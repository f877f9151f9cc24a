"""Moving averages folded into hash fields in Redis, one atomic step each (``lua/average.lua``).

Several processes learn the same figures at once (an instance's load times and silence
statistics, the interactive wait of the degradation level); a read then a write would lose
samples between them, so each fold is one script: one round trip, no lost sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.client import Pipeline

from app.state.scripts import evalsha_on, script

#: Weight of the newest sample in a moving average.
EWMA_ALPHA = 0.2


@dataclass(frozen=True)
class Averages:
    redis: redis.Redis

    def fold(
        self,
        key: str,
        samples: dict[str, float],
        alpha: float = EWMA_ALPHA,
        client: Pipeline | None = None,
    ) -> None:
        """Fold ``samples`` into the moving averages of the hash ``key`` (one round trip,
        or part of ``client``'s pipeline, which ``scripts.pipelined`` runs)."""
        if samples:
            args = [alpha, *(x for item in samples.items() for x in item)]
            if client is None:
                script(self.redis, "average.lua")(keys=[key], args=args)
            else:
                evalsha_on(client, self.redis, "average.lua", [key], args)
