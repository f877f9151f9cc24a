"""The circuit breaker of each instance: ``breaker`` and ``down_until`` in its hash.

An instance that keeps failing gets no job for a while. Its breaker opens after
``breaker_threshold`` failures in a row, at once when the server refused the connection (or
every request on it went silent), or when its half-open probe fails; it stays open
``down_cooldown`` seconds, then lets one probe job through, and closes on the first success.

The transitions happen inside the slot scripts (``lua/breaker.lua`` is included into
``acquire.lua`` and ``finish.lua``), because a breaker decides whether a slot may be taken and
must change in the same atomic step as the slot; this class reads the state and holds the
settings the scripts are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import redis

from app.settings import get_settings
from app.state import keys

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class Breaker:
    redis: redis.Redis
    ns: str

    @staticmethod
    def threshold() -> int:
        """Failures in a row that open the breaker."""
        return get_settings().breaker_threshold

    @staticmethod
    def cooldown() -> float:
        """Seconds an open breaker stays open before its probe."""
        return get_settings().down_cooldown

    def state(self, instance: str) -> str:
        """``closed``, ``open`` or ``half_open``."""
        state = self.redis.hget(keys.instance(self.ns, instance), "breaker")
        return cast(str | None, state) or "closed"
