"""The rate-limit policy in force: one JSON value (``<ns>:policy``) and its refresh turn.

Every process reads the value (through :mod:`app.policy.live`, which parses it, caches it
for a second and falls back on the settings); it is written when a change is pushed, and
re-pushed from the database once per heartbeat by whichever process takes the turn
(``<ns>:policy:turn``). That re-push is a compare-and-set watched from before the database is
read, so a change pushed meanwhile is not overwritten with an older read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import redis
from redis import WatchError

from app.state import keys


class PolicyInForce:
    """The policy value and its refresh turn, under one namespace."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis, self.ns = client, ns
        #: The policy in force (JSON).
        self.key = keys.policy(ns)
        #: Which process re-pushes the database's policy this heartbeat.
        self.turn_key = keys.policy_turn(ns)

    def get(self) -> str | None:
        """The JSON in force, or None when none was pushed."""
        return cast("str | None", self.redis.get(self.key))  # the client decodes responses

    def set(self, value: str) -> bool:
        """Put ``value`` in force; returns whether it differs from what was there (the
        comparison and the write are one command: SET ... GET)."""
        return bool(self.redis.set(self.key, value, get=True) != value)

    def exists(self) -> bool:
        """Whether a policy was pushed."""
        return bool(self.redis.exists(self.key))

    def take_refresh_turn(self, ttl_s: float) -> bool:
        """Whether this caller re-pushes the policy now: the first to ask in ``ttl_s`` does."""
        return bool(self.redis.set(self.turn_key, 1, nx=True, px=max(1, int(ttl_s * 1000))))

    def give_back_refresh_turn(self) -> None:
        """Let another process take this turn (this one could not do its part)."""
        self.redis.delete(self.turn_key)

    def set_if_unchanged(self, value: Callable[[], str]) -> bool:
        """Watch the value in force, then compute the new one with ``value()`` and write it,
        unless it is already there or the value changed meanwhile (a newer push wins).
        Returns whether it wrote. An exception from ``value()`` propagates, nothing written."""
        with self.redis.pipeline() as pipe:
            pipe.watch(self.key)
            new = value()
            if pipe.get(self.key) == new:
                return False
            pipe.multi()
            pipe.set(self.key, new)
            try:
                pipe.execute()
            except WatchError:
                return False
        return True
