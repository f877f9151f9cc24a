"""The fleet's degradation level in Redis: one hash (``<ns>:degradation``) and a turn key.

The hash holds the level the signals called for (``level``, ``reason``, ``calm_since``: since
when the signals have asked for less), an operator's ``override``, and the interactive wait's
moving average (``interactive_wait_s``, ``waited_at``). The rules that compute the level, and
the process's cached copy of it, are the policy's (:mod:`app.policy.degradation`); this class
reads and writes the hash, and hands out the evaluation turn (one router per heartbeat).
"""

from __future__ import annotations

import time
from typing import cast

import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from app.state import keys
from app.state.averages import Averages
from app.state.scripts import pipelined


class DegradationState:
    """The degradation hash and the evaluation turn of one namespace."""

    def __init__(self, client: redis.Redis, ns: str, averages: Averages) -> None:
        self.redis, self.ns, self.averages = client, ns, averages
        #: The level's hash.
        self.key = keys.degradation(ns)
        #: Which router evaluates the level this heartbeat.
        self.turn_key = keys.degradation_turn(ns)

    def level(self) -> int:
        """The level in force: the operator's override, else the evaluated level (0: none)."""
        override, stored = self.redis.hmget(self.key, "override", "level")
        return int(override if override is not None else stored or 0)

    def evaluated(self) -> tuple[int, float | None]:
        """The level last evaluated (ignoring any override), and its ``calm_since``."""
        level, calm = self.redis.hmget(self.key, "level", "calm_since")
        return int(level or 0), float(calm) if calm else None

    def record_wait(self, wait_s: float, alpha: float) -> None:
        """Fold an interactive job's wait into the moving average, and note when (one round
        trip)."""

        def queue(pipe: Pipeline) -> None:
            self.averages.fold(self.key, {"interactive_wait_s": wait_s}, alpha=alpha, client=pipe)
            pipe.hset(self.key, "waited_at", time.time())

        pipelined(self.redis, queue)

    def interactive_wait(self) -> tuple[float, float | None]:
        """The interactive wait's moving average (0 if none yet), and when it was last fed
        (epoch seconds; None: never)."""
        wait, at = self.redis.hmget(self.key, "interactive_wait_s", "waited_at")
        return float(wait or 0), float(at) if at is not None else None

    def stored(self) -> dict[str, str]:
        """The hash as stored: level, reason, override, the interactive wait..."""
        return cast(dict[str, str], self.redis.hgetall(self.key))

    def pin(self, level: int | None) -> None:
        """Set the operator's override to ``level``, or remove it (None)."""
        if level is None:
            self.redis.hdel(self.key, "override")
        else:
            self.redis.hset(self.key, "override", level)

    def take_turn(self, ttl_s: float) -> bool:
        """Whether this caller evaluates the level now: the first to ask in ``ttl_s`` does."""
        return bool(self.redis.set(self.turn_key, 1, nx=True, px=int(ttl_s * 1000)))

    def write(self, level: int, reason: str, calm_since: float | None) -> None:
        """Store an evaluation: the level, why, and since when the signals ask for less
        (None: they do not)."""
        mapping: dict[FieldT, EncodableT] = {"level": level, "reason": reason}
        self.redis.hset(self.key, mapping=mapping)
        if calm_since is None:
            self.redis.hdel(self.key, "calm_since")
        else:
            self.redis.hset(self.key, "calm_since", calm_since)
