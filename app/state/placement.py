"""The placement plan as last made by a router: kept for people to see, and for the instance
workers to act on.

Each router process plans for itself (``app.jobs.placement``) and routes by its own plan; the
copy here shows the plan (the dashboard, ``corral fleet list``), and tells each instance
worker which models its box should hold and which ones the plan switched it to, so that the
worker unloads the model leaving and preloads the one arriving (``app.jobs.model_swap``). It
expires if no router made one for a while, so a stale plan is never shown or acted on.
"""

from __future__ import annotations

import json
from typing import Literal, NamedTuple, cast

import redis

from app.state import keys

#: Seconds a nudge nobody took is kept: a worker that was not waiting (restarting) must not
#: act on an old one much later; its heartbeat follows the plan anyway.
NUDGE_TTL_S = 5


#: Which router made a plan, and when (``Published.by``, ``Published.at``).
Version = tuple[str, float]


class Published(NamedTuple):
    by: str
    at: float
    hold: dict[str, list[str]]
    arriving: dict[str, dict[str, float]]
    wanted: dict[str, float]
    seen: dict[str, int]


class PlacementShown:
    """``publish`` the models each instance should hold (and those arriving there); ``read``
    them back (None: no plan); ``moves`` for one instance."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.redis = client
        self.ns = ns
        self.key, self.arriving_key = keys.placement(ns), keys.placement_arriving(ns)

    def publish(
        self,
        hold: dict[str, list[str]],
        ttl_s: float,
        arriving: dict[str, dict[str, float]] | None = None,
        by: str = "",
        at: float = 0.0,
        wanted: dict[str, float] | None = None,
        seen: dict[str, int] | None = None,
        based_on: Version | Literal[False] | None = False,
    ) -> bool:
        """``by``: the router process that made the plan, ``at``: when (its fleet snapshot's
        wall-clock time); ``wanted``: until when each model keeps its box without a backlog
        (``routing.placement``), so that every router keeps it, not only the one that saw its
        jobs; ``seen``: each model's backlog as the plan read it (the next plan, whoever
        makes it, rebalances only backlogs that did not grow since).

        ``based_on``: the plan this one was built on (None: none was current); if another is
        published by then, this one is not, and False comes back (Redis's optimistic
        locking, ``WATCH``). False (the default): published whatever is there."""
        px = max(1, int(ttl_s * 1000))
        moves = {
            "by": by,
            "at": at,
            "arriving": arriving or {},
            "wanted": wanted or {},
            "seen": seen or {},
        }
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                if based_on is not False:
                    pipe.watch(self.arriving_key)
                    current = cast("str | None", pipe.get(self.arriving_key))  # decoded
                    if _version(current) != based_on:
                        return False
                    pipe.multi()
                # A hash, so that a slot's hand-off reads its own instance's models, not the
                # whole fleet's plan. A plan holding nothing (no instance up) is no plan.
                pipe.delete(self.key)
                if hold:
                    pipe.hset(self.key, mapping={i: json.dumps(m) for i, m in hold.items()})
                    pipe.pexpire(self.key, px)
                pipe.set(self.arriving_key, json.dumps(moves, sort_keys=True), px=px)
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def latest(self) -> Published | None:
        """The last plan published, None if none is current."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key)
            pipe.get(self.arriving_key)
            hold_raw, moves_raw = pipe.execute()
        if not hold_raw or moves_raw is None:
            return None
        moves = json.loads(moves_raw)
        return Published(
            moves["by"],
            float(moves["at"]),
            _hold(hold_raw),
            moves["arriving"],
            moves.get("wanted", {}),
            moves.get("seen", {}),
        )

    def read(self) -> dict[str, list[str]] | None:
        raw = cast("dict[str, str]", self.redis.hgetall(self.key))  # the client decodes
        return _hold(raw) if raw else None

    def moves(self, instance: str) -> tuple[frozenset[str], dict[str, float]] | None:
        """(models ``instance`` should hold, those of them the plan switched it to with the
        time it decided each switch), or None when no current plan covers the instance (none
        made lately, or it was down)."""
        latest = self.latest()
        if latest is None:
            return None
        held = latest.hold.get(instance)
        if held is None:
            return None
        return frozenset(held), latest.arriving.get(instance, {})

    def nudge(self, instance: str, models: list[str]) -> None:
        """Tell ``instance``'s worker to load ``models`` now (``wait_nudge``): the plan just
        moved them onto it for urgent jobs."""
        key = keys.placement_nudge(self.ns, instance)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *models)
            pipe.expire(key, NUDGE_TTL_S)
            pipe.execute()

    def wait_nudge(self, instance: str, timeout: float) -> str | None:
        """Block until a router nudges ``instance``: the model to load (None: ``timeout``
        passed). A model nudged twice comes twice; loading it is asked once."""
        got = self.redis.blpop([keys.placement_nudge(self.ns, instance)], timeout=timeout)
        return cast("tuple[str, str]", got)[1] if got else None

    def clear(self) -> None:
        """Forget the plan (the bench, between runs that must start with nothing loaded)."""
        self.redis.delete(self.key, self.arriving_key)


def _version(raw: str | None) -> Version | None:
    if raw is None:
        return None
    moves = json.loads(raw)
    return moves["by"], float(moves["at"])


def _hold(raw: dict[str, str]) -> dict[str, list[str]]:
    return {instance: json.loads(models) for instance, models in raw.items()}
