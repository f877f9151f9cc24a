"""Rate limits: token buckets in Redis, per agent, per agent class and global.

A job takes one token from every bucket that applies to it (its agent's, its class's, the
global one), in one Lua call. A bucket refills at its rate and holds at most
``BURST_SECONDS`` worth of tokens. The buckets themselves are the state layer's
(:mod:`app.state.buckets`, the same implementation as an instance's own rate limit); this
module decides which buckets a job takes from, and what a full bucket means. What happens
over the limit is the class's choice:

* ``refuse``: ``infer.delay()`` raises :class:`~app.errors.RateLimited` at the call (the
  gateway answers 429), naming when to retry; nothing is queued.
* ``wait`` (default): the router reserves the job's token anyway (a bucket may go below
  zero: the queue of reservations), and the job starts when its token is due. It waits in
  RabbitMQ meanwhile, not in a router thread (``app.jobs.lifecycle.RateLimits``), so a limited
  agent never holds back anyone else's jobs.

The rates and each class's choice come from the live policy (``app.policy.live``): a change made
with ``corral policy`` or the admin API applies to the next job, within a second.
"""

from __future__ import annotations

from app.policy.live import Policy, live_policy
from app.settings import get_settings
from app.state import keys
from app.state.buckets import BURST_SECONDS, Bucket
from app.state.fleet import fleet_state

__all__ = ["BURST_SECONDS", "Bucket", "buckets", "take"]


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
