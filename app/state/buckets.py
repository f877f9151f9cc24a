"""Token buckets: the one implementation of rate limits in Redis.

Two limits are token buckets: an instance's own rate (``rate_limit_per_minute``,
:mod:`app.state.instance_rate`) and the agent, class and global rates of the live policy
(:mod:`app.policy.rate_limits`). Their arithmetic is one piece of Lua, ``lua/bucket.lua``
(refill at the rate, cap at ``BURST_SECONDS`` of tokens, a clock gone back adds nothing). This
class takes tokens with ``lua/take.lua`` (one job's, or a bulk call's all at once); the
instance's bucket cannot be taken here, because it must be taken in the same atomic step as
the slot it guards, so ``bucket.lua`` is included into the slot scripts (``acquire.lua``, and
the hand-off of ``finish.lua`` and ``reclaim.lua``) too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from app.state.scripts import script

#: A bucket holds this many seconds of tokens: the burst an idle agent (or instance) may send.
BURST_SECONDS = 10.0


@dataclass(frozen=True)
class Bucket:
    key: str
    per_minute: float

    @property
    def burst(self) -> float:
        return max(1.0, self.per_minute / 60 * BURST_SECONDS)


@dataclass(frozen=True)
class TokenBuckets:
    redis: redis.Redis

    def take(self, buckets: Sequence[Bucket], *, refuse: bool, now: float | None = None) -> float:
        """Take one token from every bucket, all or none; the seconds until it is due (0: now).

        Without ``refuse`` the token is taken even when it is not there yet (a bucket goes
        below zero: a reservation, due in the returned seconds); with ``refuse``, a job that
        would have to wait takes nothing.
        """
        wait, _ = self.take_counts([(b, 1) for b in buckets], refuse=refuse, now=now)
        return wait

    def take_counts(
        self, wanted: Sequence[tuple[Bucket, int]], *, refuse: bool, now: float | None = None
    ) -> tuple[float, int | None]:
        """Take ``count`` tokens from each bucket, all or none (a bulk call's jobs at once).

        Returns the seconds until the last of them is due (0: now) and the index in ``wanted``
        of the bucket that waits longest (None when none waits). ``refuse`` as in ``take``.
        """
        if not wanted:
            return 0.0, None
        args: list[float | int] = [now or time.time(), int(refuse)]
        for bucket, count in wanted:
            args += [bucket.per_minute / 60, bucket.burst, count]
        keys = [b.key for b, _ in wanted]
        wait, longest = script(self.redis, "take.lua")(keys=keys, args=args)
        return float(wait), int(longest) - 1 if int(longest) else None
