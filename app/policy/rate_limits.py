"""Rate limits: token buckets in Redis, per agent, per agent class and global.

A job takes one token from every bucket that applies to it (its agent's, its class's, the
global one), in one Lua call. A bucket refills at its rate and holds at most
``BURST_SECONDS`` worth of tokens. What happens over the limit is the class's choice:

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

import time
from dataclasses import dataclass

from app.policy.live import Policy, live_policy
from app.settings import get_settings
from app.state.fleet import redis_client

#: A bucket holds this many seconds of tokens: the burst an idle agent may send at once.
BURST_SECONDS = 10.0

# KEYS: the buckets. ARGV: now, refuse (1/0), then rate (tokens/s) and burst per bucket.
# Returns the seconds until the job's token is due (0: now), as a string (Lua numbers would
# be truncated to integers). With refuse=1 nothing is taken unless the job may start now.
_TAKE = """
local now, refuse = tonumber(ARGV[1]), ARGV[2] == '1'
local wait, level = 0, {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(v[1] or burst)
  tokens = math.min(burst, tokens + (now - tonumber(v[2] or now)) * rate)
  level[i] = tokens
  if tokens < 1 then wait = math.max(wait, (1 - tokens) / rate) end
end
if refuse and wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'tokens', level[i] - 1, 'at', now)
  redis.call('EXPIRE', key, 86400)
end
return tostring(wait)
"""


@dataclass(frozen=True)
class Bucket:
    key: str
    per_minute: float

    @property
    def burst(self) -> float:
        return max(1.0, self.per_minute / 60 * BURST_SECONDS)


def buckets(agent: str | None, agent_class: str, policy: Policy, namespace: str) -> list[Bucket]:
    """The buckets a job of this agent and class takes a token from."""
    ns, found = f"{namespace}:rate", []
    if policy.global_rate_per_minute:
        found.append(Bucket(f"{ns}:global", policy.global_rate_per_minute))
    limits = policy.classes.get(agent_class)
    if limits is not None and limits.rate_per_minute:
        found.append(Bucket(f"{ns}:class:{agent_class}", limits.rate_per_minute))
    if limits is not None and limits.agent_rate_per_minute and agent:
        found.append(Bucket(f"{ns}:agent:{agent}", limits.agent_rate_per_minute))
    return found


def take(agent: str | None, agent_class: str, *, refuse: bool) -> float:
    """Take the job's token; returns the seconds until it is due (0: start now).

    With ``refuse``, a job that would have to wait takes nothing.
    """
    settings = get_settings()
    found = buckets(agent, agent_class, live_policy(settings), settings.namespace)
    if not found:
        return 0.0
    args: list[float | int] = [time.time(), int(refuse)]
    for bucket in found:
        args += [bucket.per_minute / 60, bucket.burst]
    script = redis_client(settings.redis_url).register_script(_TAKE)
    return float(script(keys=[b.key for b in found], args=args))
