"""Rate limits: token buckets in Redis, per agent, per agent class and global.

A job takes one token from every bucket that applies to it (its agent's, its class's, the
global one), in one Lua call. A bucket refills at its rate and holds at most
``BURST_SECONDS`` worth of tokens. The buckets themselves are the state layer's
(:mod:`app.state.buckets`, the same implementation as an instance's own rate limit); this
module decides which buckets a job takes from, and what a full bucket means. What happens
over the limit is the class's choice:

* ``refuse``: ``infer.delay()`` raises :class:`~app.errors.RateLimited` at the call (the
  gateway answers 429), naming when to retry; nothing is queued. A bulk call
  (``infer.submit_many``) takes the tokens of all its jobs of refusing classes at once, or
  none (:func:`take_all`): refused, it queues nothing, and one that needs more tokens from a
  bucket than the bucket holds can never pass, so it is told the most a call may carry.
* ``wait`` (default): the router reserves the job's token anyway (a bucket may go below
  zero: the queue of reservations), and the job starts when its token is due. It waits in
  RabbitMQ meanwhile, not in a router thread (``app.jobs.lifecycle.RateLimits``), so a limited
  agent never holds back anyone else's jobs.

The rates and each class's choice come from the live policy (``app.policy.live``): a change made
with ``corral policy`` or the admin API applies to the next job, within a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.policy.live import Policy, live_policy
from app.settings import get_settings
from app.state import keys
from app.state.buckets import BURST_SECONDS, Bucket
from app.state.fleet import fleet_state

__all__ = ["BURST_SECONDS", "Bucket", "Shortfall", "buckets", "take", "take_all"]


def buckets(agent: str | None, agent_class: str, policy: Policy, namespace: str) -> list[Bucket]:
    """The buckets a job of this agent and class takes a token from."""
    found: list[Bucket] = []
    if policy.global_rate_per_minute:
        found.append(Bucket(keys.rate_global(namespace), policy.global_rate_per_minute))
    limits = policy.classes.get(agent_class)
    if limits is not None and limits.rate_per_minute:
        found.append(Bucket(keys.rate_class(namespace, agent_class), limits.rate_per_minute))
    if limits is not None and limits.agent_rate_per_minute and agent:
        found.append(Bucket(keys.rate_agent(namespace, agent), limits.agent_rate_per_minute))
    return found


def take(agent: str | None, agent_class: str, *, refuse: bool) -> float:
    """Take the job's token; returns the seconds until it is due (0: start now).

    With ``refuse``, a job that would have to wait takes nothing.
    """
    settings = get_settings()
    found = buckets(agent, agent_class, live_policy(settings), settings.namespace)
    return fleet_state().buckets.take(found, refuse=refuse)


@dataclass(frozen=True)
class Shortfall:
    """Why a bulk call's tokens were refused: the bucket that waits longest for them."""

    #: Seconds until every token the call needs from ``bucket`` is there.
    wait: float
    #: The index (in the jobs given to :func:`take_all`) of the first job taking from it.
    job: int
    bucket: Bucket
    #: The tokens the call needs from it: one per job taking from it.
    needed: int
    #: Which limit it is, in words: "the global", "class 'x''s", "agent 'y''s".
    limit: str

    @property
    def never_fits(self) -> bool:
        """More tokens than the bucket ever holds: no retry of the same call can pass."""
        return self.needed > self.bucket.burst


def take_all(jobs: Sequence[tuple[str | None, str]]) -> Shortfall | None:
    """Take the token of every ``(agent, agent_class)`` job at once, all or none, refusing
    rather than waiting (a bulk call's jobs of refusing classes, at the call). None: taken."""
    settings = get_settings()
    policy, ns = live_policy(settings), settings.namespace
    tally: dict[str, tuple[Bucket, int, int, str]] = {}  # key: bucket, tokens, first job, limit
    for index, (agent, agent_class) in enumerate(jobs):
        for bucket in buckets(agent, agent_class, policy, ns):
            if bucket.key in tally:
                _, count, first, limit = tally[bucket.key]
                tally[bucket.key] = (bucket, count + 1, first, limit)
            else:
                tally[bucket.key] = (bucket, 1, index, _limit(bucket, agent, agent_class, ns))
    wanted = list(tally.values())
    for bucket, count, first, limit in wanted:
        if count > bucket.burst:  # never there at once: say so without asking Redis
            return Shortfall(bucket.burst / (bucket.per_minute / 60), first, bucket, count, limit)
    wait, longest = fleet_state().buckets.take_counts(
        [(bucket, count) for bucket, count, _, _ in wanted], refuse=True
    )
    if longest is None:
        return None
    bucket, count, first, limit = wanted[longest]
    return Shortfall(wait, first, bucket, count, limit)


def _limit(bucket: Bucket, agent: str | None, agent_class: str, namespace: str) -> str:
    if bucket.key == keys.rate_global(namespace):
        return "the global"
    if bucket.key == keys.rate_class(namespace, agent_class):
        return f"class {agent_class!r}'s"
    return f"agent {agent!r}'s"
