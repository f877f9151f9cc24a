"""The fleet's live state in Redis: the registry, the stats, and the slots.

The slot counter is what guarantees that no instance ever runs more than its parallelism:

* ``acquire`` reserves a slot on the first candidate that has one, or registers the job as
  a waiter of its model (a sorted set ordered by tier, priority, then arrival);
* ``finish`` frees the slot of a finished attempt and, in the same atomic step, hands it to
  the best waiter that may use that instance, so the freed slot goes to the most urgent job,
  not to whichever router thread wakes first;
* every grant has a lease; the instance worker extends it while the job runs, and
  ``reclaim_expired`` frees the slots of grants nobody is using (a crashed router or worker).

Each step is one Lua script, so each is atomic and costs one round trip. The scripts touch
keys they compute from the namespace, so they need a single Redis, not a Redis Cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import redis

from app.settings import InstanceConfig, get_settings
from routing import FleetSnapshot, InstanceStats

#: Weight of the newest sample in the service-time moving average.
EWMA_ALPHA = 0.2
#: A job id returned by ``acquire`` for a job that already finished.
DONE = "!done"

# Bulkheads: slots held per agent class, for the classes with a cap (max_in_flight). A job of
# such a class records its class when granted (job_class) or when it starts waiting (wclass,
# "class|cap"), and gives the count back with its grant.
_CLASSES = """
local function class_full(ns, name, cap)
  return tonumber(redis.call('HGET', ns .. ':class_in_flight', name) or '0') >= cap
end
local function waiter_class(ns, job)
  local c = redis.call('HGET', ns .. ':wclass', job)
  if not c then return nil, 0 end
  local sep = string.find(c, '|', 1, true)
  return string.sub(c, 1, sep - 1), tonumber(string.sub(c, sep + 1))
end
local function class_take(ns, job, name)
  redis.call('HINCRBY', ns .. ':class_in_flight', name, 1)
  redis.call('HSET', ns .. ':job_class', job, name)
end
local function class_give_back(ns, job)
  local name = redis.call('HGET', ns .. ':job_class', job)
  if name then
    redis.call('HINCRBY', ns .. ':class_in_flight', name, -1)
    redis.call('HDEL', ns .. ':job_class', job)
  end
end
"""

# An instance's own rate limit (rate_limit_per_minute): a token bucket in its hash, with ten
# seconds of burst, taken by every grant. With no token the instance counts as full.
_RATE = """
local function rate_take(key, now)
  local rate = tonumber(redis.call('HGET', key, 'rate_per_minute') or '0')
  if rate <= 0 then return true end
  local burst = math.max(1, rate / 6)
  local v = redis.call('HMGET', key, 'rate_tokens', 'rate_at')
  local tokens = tonumber(v[1] or '') or burst
  local elapsed = math.max(0, now - (tonumber(v[2] or '') or now))
  tokens = math.min(burst, tokens + elapsed * rate / 60)
  if tokens < 1 then return false end
  redis.call('HSET', key, 'rate_tokens', tokens - 1, 'rate_at', now)
  return true
end
"""

_HANDOFF = (
    _CLASSES
    + _RATE
    + """
local function handoff(ns, inst, now, lease)
  -- A removed instance (corral fleet remove --force) keeps no counters.
  if redis.call('SISMEMBER', ns .. ':instances', inst) == 0 then return false end
  local key = ns .. ':inst:' .. inst
  local v = redis.call('HMGET', key, 'enabled', 'down_until', 'in_flight', 'capacity', 'breaker')
  if v[1] == '1' and tonumber(v[2] or '0') <= now and (v[5] or 'closed') == 'closed'
     and tonumber(v[3] or '0') <= tonumber(v[4] or '0') then
    local best, best_score, best_model
    for _, m in ipairs(redis.call('SMEMBERS', key .. ':models')) do
      -- The first waiters that may use this instance; those that may not (it failed them,
      -- their class is at its cap) are skipped. Deep enough that a free slot is not left
      -- idle behind a crowd of such waiters until the others look again (within a second).
      local w = redis.call('ZRANGE', ns .. ':wait:' .. m, 0, 63, 'WITHSCORES')
      for j = 1, #w, 2 do
        local s = tonumber(w[j + 1])
        if best_score and s >= best_score then break end
        local ex = redis.call('HGET', ns .. ':excl', w[j])
        local name, cap = waiter_class(ns, w[j])
        if (not ex or not string.find(',' .. ex .. ',', ',' .. inst .. ',', 1, true))
           and not (name and class_full(ns, name, cap)) then
          best, best_score, best_model = w[j], s, m
          break
        end
      end
    end
    if best and rate_take(key, now) then
      local name = waiter_class(ns, best)
      if name then class_take(ns, best, name) end
      redis.call('HDEL', ns .. ':wclass', best)
      redis.call('ZREM', ns .. ':wait:' .. best_model, best)
      redis.call('HDEL', ns .. ':excl', best)
      redis.call('HSET', ns .. ':grants', best, inst)
      redis.call('ZADD', ns .. ':leases', now + lease, best)
      redis.call('RPUSH', ns .. ':handoff:' .. best, inst)
      redis.call('EXPIRE', ns .. ':handoff:' .. best, 3600)
      return best
    end
  end
  redis.call('HINCRBY', key, 'in_flight', -1)
  return false
end
"""
)

# ARGV: ns, job, model, score, now, lease, excluded_csv, class, cap (0: none), candidate...
_ACQUIRE = (
    _CLASSES
    + _RATE
    + """
local ns, job, model = ARGV[1], ARGV[2], ARGV[3]
local score, now, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local class, cap = ARGV[8], tonumber(ARGV[9])
if redis.call('EXISTS', ns .. ':done:' .. job) == 1 then return '!done' end
local held = redis.call('HGET', ns .. ':grants', job)
if held then
  redis.call('DEL', ns .. ':handoff:' .. job)
  redis.call('ZADD', ns .. ':leases', now + lease, job)
  return held
end
local candidates = #ARGV
if cap > 0 and class_full(ns, class, cap) then candidates = 9 end  -- its class is at its cap
for i = 10, candidates do
  local key = ns .. ':inst:' .. ARGV[i]
  local v = redis.call('HMGET', key, 'in_flight', 'capacity', 'enabled', 'breaker', 'down_until')
  local room = tonumber(v[2] or '0')
  local breaker = v[4] or 'closed'
  if breaker ~= 'closed' then
    -- Open: nothing until the cooldown ends; then half-open: one probe job at a time.
    room = (tonumber(v[5] or '0') <= now) and 1 or 0
  end
  if v[3] == '1' and tonumber(v[1] or '0') < room and rate_take(key, now) then
    if breaker == 'open' then redis.call('HSET', key, 'breaker', 'half_open') end
    redis.call('HINCRBY', key, 'in_flight', 1)
    redis.call('HSET', ns .. ':grants', job, ARGV[i])
    redis.call('ZADD', ns .. ':leases', now + lease, job)
    redis.call('ZREM', ns .. ':wait:' .. model, job)
    redis.call('HDEL', ns .. ':excl', job)
    redis.call('HDEL', ns .. ':wclass', job)
    if cap > 0 then class_take(ns, job, class) end
    return ARGV[i]
  end
end
-- Not NX: a job's deadline moves when the degradation level reorders its tier.
redis.call('ZADD', ns .. ':wait:' .. model, score, job)
if ARGV[7] ~= '' then
  redis.call('HSET', ns .. ':excl', job, ARGV[7])
else
  redis.call('HDEL', ns .. ':excl', job)
end
if cap > 0 then
  redis.call('HSET', ns .. ':wclass', job, class .. '|' .. cap)
else
  redis.call('HDEL', ns .. ':wclass', job)
end
return false
"""
)

# ARGV: ns, job, instance, token, now, lease
_CONFIRM = """
local ns, job, inst, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', ns .. ':done:' .. job) == 1 then return 'done' end
if redis.call('HGET', ns .. ':grants', job) ~= inst then return 'nogrant' end
if redis.call('HGET', ns .. ':running', job) == token then return 'dup' end
redis.call('HSET', ns .. ':running', job, token)
redis.call('ZADD', ns .. ':leases', tonumber(ARGV[5]) + tonumber(ARGV[6]), job)
return 'ok'
"""

# ARGV: ns, job, instance, now, lease, ok, service_ms, model, open_now, done_ttl, alpha,
#       breaker_threshold, breaker_cooldown, cancelled
# A cancelled job (revoked while it ran) ends like a finished one (its id is done) but says
# nothing about the instance: no service time, no failure, the breaker as it was.
_FINISH = (
    _HANDOFF
    + """
local ns, job, inst = ARGV[1], ARGV[2], ARGV[3]
local now, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local cancelled = ARGV[14] == '1'
if redis.call('HGET', ns .. ':grants', job) ~= inst then return false end
redis.call('HDEL', ns .. ':grants', job)
class_give_back(ns, job)
redis.call('HDEL', ns .. ':running', job)
redis.call('ZREM', ns .. ':leases', job)
if ARGV[6] == '1' or cancelled then
  redis.call('SET', ns .. ':done:' .. job, '1', 'EX', tonumber(ARGV[10]))
end
if redis.call('SISMEMBER', ns .. ':instances', inst) == 0 then return false end
local key = ns .. ':inst:' .. inst
if cancelled then
  redis.call('HINCRBY', key, 'cancelled', 1)
elseif ARGV[6] == '1' then
  local ms, alpha = tonumber(ARGV[7]), tonumber(ARGV[11])
  for _, field in ipairs({'ewma_ms', 'ewma:' .. ARGV[8]}) do
    local old = tonumber(redis.call('HGET', key, field) or '')
    redis.call('HSET', key, field, old and (old * (1 - alpha) + ms * alpha) or ms)
  end
  if tonumber(redis.call('HGET', key, 'errors') or '0') > 0 then
    redis.call('HINCRBY', key, 'errors', -1)
  end
  redis.call('HINCRBY', key, 'completed', 1)
  redis.call('HSET', key, 'consecutive', 0, 'breaker', 'closed')
else
  redis.call('HINCRBY', key, 'errors', 1)
  redis.call('HINCRBY', key, 'failed', 1)
  local consecutive = redis.call('HINCRBY', key, 'consecutive', 1)
  local was = redis.call('HGET', key, 'breaker') or 'closed'
  if ARGV[9] == '1' or was == 'half_open' or consecutive >= tonumber(ARGV[12]) then
    redis.call('HSET', key, 'breaker', 'open', 'down_until', now + tonumber(ARGV[13]))
  end
end
return handoff(ns, inst, now, lease)
"""
)

# ARGV: ns, instance, token, now, lease, job...: jobs this worker is running right now.
# Extends their leases, and puts back any grant Redis lost (a restart without persistence),
# so the slot count never forgets a job that is really running.
_HOLD = """
local ns, inst, token = ARGV[1], ARGV[2], ARGV[3]
local expiry = tonumber(ARGV[4]) + tonumber(ARGV[5])
if redis.call('SISMEMBER', ns .. ':instances', inst) == 0 then return 0 end
for i = 6, #ARGV do
  local job = ARGV[i]
  if redis.call('HGET', ns .. ':grants', job) ~= inst then
    redis.call('HSET', ns .. ':grants', job, inst)
    redis.call('HSET', ns .. ':running', job, token)
    redis.call('HINCRBY', ns .. ':inst:' .. inst, 'in_flight', 1)
  end
  redis.call('ZADD', ns .. ':leases', expiry, job)
end
return #ARGV - 5
"""

# ARGV: ns, instance. The slot counter must equal the grants on the instance; anything that
# changed one without the other (Redis losing keys mid-job, a removed instance) is undone
# here, each heartbeat. Returns the counter's old value, or false when it was right.
_RECONCILE = """
local ns, inst = ARGV[1], ARGV[2]
local key = ns .. ':inst:' .. inst
if redis.call('SISMEMBER', ns .. ':instances', inst) == 0 then return false end
local held = 0
local grants = redis.call('HGETALL', ns .. ':grants')
for i = 2, #grants, 2 do
  if grants[i] == inst then held = held + 1 end
end
local counted = tonumber(redis.call('HGET', key, 'in_flight') or '0')
if counted == held then return false end
redis.call('HSET', key, 'in_flight', held)
return counted
"""

# ARGV: ns, now, lease[, job...]: the given jobs, or else those whose lease expired
_RECLAIM = (
    _HANDOFF
    + """
local ns, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local expired = {unpack(ARGV, 4)}
if #expired == 0 then
  expired = redis.call('ZRANGEBYSCORE', ns .. ':leases', '-inf', now, 'LIMIT', 0, 100)
end
for _, job in ipairs(expired) do
  local inst = redis.call('HGET', ns .. ':grants', job)
  redis.call('ZREM', ns .. ':leases', job)
  if inst then
    redis.call('HDEL', ns .. ':grants', job)
    redis.call('HDEL', ns .. ':running', job)
    class_give_back(ns, job)
    handoff(ns, inst, now, lease)
  end
end
return #expired
"""
)

# KEYS[1]: a hash; ARGV: alpha, then field, sample, ...: each field becomes the moving average
# of its samples (the first sample as it is), in one atomic step.
_AVERAGE = """
local alpha = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '')
  local sample = tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], ARGV[i], old and (old * (1 - alpha) + sample * alpha) or sample)
end
return 0
"""

Confirmation = Literal["ok", "dup", "nogrant", "done"]


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


@dataclass
class FleetState:
    """Typed access to the fleet's keys under one namespace."""

    redis: redis.Redis
    ns: str

    def __post_init__(self) -> None:
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._confirm = self.redis.register_script(_CONFIRM)
        self._finish = self.redis.register_script(_FINISH)
        self._reclaim = self.redis.register_script(_RECLAIM)
        self._hold = self.redis.register_script(_HOLD)
        self._reconcile = self.redis.register_script(_RECONCILE)
        self._average = self.redis.register_script(_AVERAGE)

    def _inst(self, name: str) -> str:
        return f"{self.ns}:inst:{name}"

    # Registry -------------------------------------------------------------------------

    def register(
        self,
        config: InstanceConfig,
        *,
        threads: int | None = None,
        models: list[str] | None = None,
    ) -> int:
        """Add or update an instance from its registry row; keeps its slot count and stats.

        ``threads`` is given by the instance's worker (its thread count, fixed at its start),
        and remembered: the capacity the routers use is the parallelism, capped by it. The
        served models are ``models`` (discovered), else the row's, else left as they are.
        Returns the capacity.
        """
        key = self._inst(config.name)
        if threads is None:
            known = self.redis.hget(key, "threads")
            threads = int(known) if known else None
        capacity = min(config.parallelism, threads or config.parallelism)
        fields = {
            "url": config.url,
            "capacity": capacity,
            "weight": config.weight,
            "role": config.role,
            "priority": config.priority,
            "rate_per_minute": config.rate_limit_per_minute or 0,
            "enabled": int(config.enabled),
            "config": config.model_dump_json(),
        }
        if threads is not None:
            fields["threads"] = threads
        with self.redis.pipeline() as pipe:
            pipe.sadd(f"{self.ns}:instances", config.name)
            pipe.hset(key, mapping=fields)
            pipe.hsetnx(key, "in_flight", 0)
            pipe.hsetnx(key, "healthy", 1)
            pipe.execute()
        if models is not None or config.models is not None:
            self.set_models(config.name, models if models is not None else config.models or [])
        return capacity

    def unregister(self, name: str) -> None:
        """Remove an instance: the routers stop seeing it at once."""
        key = self._inst(name)
        with self.redis.pipeline() as pipe:
            pipe.srem(f"{self.ns}:instances", name)
            pipe.delete(key, f"{key}:models")
            pipe.execute()
        self._refresh_model_index()

    def set_models(self, name: str, models: list[str]) -> None:
        key = self._inst(name)
        with self.redis.pipeline() as pipe:
            pipe.delete(f"{key}:models")
            if models:
                pipe.sadd(f"{key}:models", *models)
            pipe.hset(key, "models", json.dumps(sorted(models)))
            pipe.execute()
        self._refresh_model_index()

    def _refresh_model_index(self) -> None:
        names = self.redis.smembers(f"{self.ns}:instances")
        keys = [f"{self._inst(n)}:models" for n in names]
        if keys:
            self.redis.sunionstore(f"{self.ns}:models", keys)
        else:
            self.redis.delete(f"{self.ns}:models")

    def report_health(
        self,
        name: str,
        *,
        healthy: bool,
        loaded: list[str],
        host_pressure: float = 0.0,
        host_cpu: float = 0.0,
        host_mem: float = 0.0,
        probe_ms: float = 0.0,
        now: float | None = None,
    ) -> None:
        """A heartbeat: the server's health, and the load of the host its worker runs on."""
        self.redis.hset(
            self._inst(name),
            mapping={
                "healthy": int(healthy),
                "loaded": json.dumps(sorted(loaded)),
                "host_pressure": host_pressure,
                "host_cpu": host_cpu,
                "host_mem": host_mem,
                "probe_ms": probe_ms,
                "last_seen": now or time.time(),
            },
        )

    def average_into(
        self,
        key: str,
        samples: dict[str, float],
        alpha: float = EWMA_ALPHA,
        client: redis.client.Pipeline | None = None,
    ) -> None:
        """Fold ``samples`` into the moving averages of the hash ``key`` (one round trip,
        or part of ``client``'s pipeline)."""
        if samples:
            args = [alpha, *(x for item in samples.items() for x in item)]
            self._average(keys=[key], args=args, client=client)

    def record_load(self, name: str, model: str, ms: float) -> None:
        """How long ``model`` took to load on the instance, learned from a cold start."""
        self.average_into(self._inst(name), {f"load:{model}": ms})

    def silence_stats(self, name: str, model: str) -> dict[str, float | bool | None]:
        """What ``app.jobs.silence`` learned of ``model`` on the instance, and whether it is loaded.

        ``ttft``: seconds to the first token beyond load and prompt evaluation; ``pe``:
        seconds of prompt evaluation per evaluated token; ``gap``: seconds between chunks;
        ``load``: seconds a cold load took (``record_load``); None where nothing was learned.
        """
        fields = [f"ttft:{model}", f"pe:{model}", f"gap:{model}", f"load:{model}", "loaded"]
        ttft, pe, gap, load_ms, loaded = self.redis.hmget(self._inst(name), fields)
        return {
            "ttft": float(ttft) if ttft else None,
            "pe": float(pe) if pe else None,
            "gap": float(gap) if gap else None,
            "load": float(load_ms) / 1000 if load_ms else None,
            "loaded": model in json.loads(loaded or "[]"),
        }

    def record_timing(self, name: str, samples: dict[str, float]) -> None:
        """Fold measured ``{"ttft:<model>": s, "pe:<model>": s, "gap:<model>": s}`` into
        the instance's moving averages."""
        self.average_into(self._inst(name), samples)

    def set_version(self, name: str, version: str) -> None:
        self.redis.hset(self._inst(name), "version", version)

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.redis.hset(self._inst(name), "enabled", int(enabled))

    def in_flight(self, name: str) -> int:
        """Jobs holding a slot on the instance: running, or queued for it."""
        return int(self.redis.hget(self._inst(name), "in_flight") or 0)

    def served_models(self) -> set[str]:
        return self.redis.smembers(f"{self.ns}:models")

    def instance_names(self) -> list[str]:
        return sorted(self.redis.smembers(f"{self.ns}:instances"))

    def snapshot(self, now: float | None = None) -> FleetSnapshot:
        names = self.instance_names()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"{self.ns}:strategy")
            for name in names:
                pipe.hgetall(self._inst(name))
            strategies, *rows = pipe.execute()
        stale = 3 * get_settings().heartbeat_interval
        return FleetSnapshot(
            tuple(_stats(n, r, stale) for n, r in zip(names, rows, strict=True) if r),
            now or time.time(),
            strategies,
        )

    def set_strategy(self, strategy: str | None, model: str = "*") -> None:
        """Change the routing strategy live (for one model, or "*" for all); None resets."""
        if strategy is None:
            self.redis.hdel(f"{self.ns}:strategy", model)
        else:
            self.redis.hset(f"{self.ns}:strategy", model, strategy)

    # Slots ----------------------------------------------------------------------------

    def acquire(
        self,
        job: str,
        model: str,
        *,
        score: float,
        candidates: list[str],
        exclude: list[str],
        agent_class: str = "default",
        class_cap: int = 0,
        now: float | None = None,
    ) -> str | None:
        """Reserve a slot on the first candidate with one free; else queue as a waiter.

        With ``class_cap``, no more than that many slots go to jobs of ``agent_class`` at once
        (a bulkhead). Returns the instance, ``DONE`` when the job already finished, or None
        (waiting). Calling it again for the same job returns the slot it already holds.
        """
        lease = get_settings().grant_lease
        return self._acquire(
            args=[
                self.ns,
                job,
                model,
                score,
                now or time.time(),
                lease,
                ",".join(exclude),
                agent_class,
                class_cap,
                *candidates,
            ]
        )

    def wait_handoff(self, job: str, timeout: float) -> str | None:
        """Block until a finishing job hands its slot to this one, or ``timeout`` passes."""
        got = self.redis.blpop([f"{self.ns}:handoff:{job}"], timeout=timeout)
        return got[1] if got else None

    def confirm(self, job: str, instance: str, token: str) -> Confirmation:
        """Called by the instance worker before it runs a job: does it hold the slot?"""
        lease = get_settings().grant_lease
        return self._confirm(args=[self.ns, job, instance, token, time.time(), lease])

    def finish(
        self,
        job: str,
        instance: str,
        *,
        ok: bool,
        model: str = "",
        service_ms: float = 0.0,
        open_breaker: bool = False,
        cancelled: bool = False,
    ) -> str | None:
        """Free the job's slot (handing it to the best waiter) and record the outcome.

        The instance's circuit breaker opens after ``breaker_threshold`` failures in a row,
        at once when ``open_breaker`` (the server refused the connection, or every request
        on it went silent), or when its half-open probe fails; it stays open
        ``down_cooldown`` seconds, then lets one probe job through, and closes on the first
        success. A ``cancelled`` job (revoked while it ran) records no outcome at all.

        Idempotent: a second call for the same job does nothing. Returns the job the slot
        was handed to, if any.
        """
        s = get_settings()
        return self._finish(
            args=[
                self.ns,
                job,
                instance,
                time.time(),
                s.grant_lease,
                int(ok),
                service_ms,
                model,
                int(open_breaker),
                s.result_expires,
                EWMA_ALPHA,
                s.breaker_threshold,
                s.down_cooldown,
                int(cancelled),
            ]
        )

    def hold(self, instance: str, token: str, jobs: list[str]) -> None:
        """The instance's worker is running ``jobs``: keep their slots (see ``_HOLD``)."""
        if jobs:
            lease = get_settings().grant_lease
            self._hold(args=[self.ns, instance, token, time.time(), lease, *jobs])

    def reconcile(self, instance: str) -> int | None:
        """Set the instance's slot counter to its grants; returns the wrong count it fixed."""
        wrong = self._reconcile(args=[self.ns, instance])
        return None if wrong is None else int(wrong)

    def forget(self, job: str, model: str) -> None:
        """A revoked job: stop waiting for a slot, and free the slot it may hold."""
        with self.redis.pipeline() as pipe:
            pipe.zrem(f"{self.ns}:wait:{model}", job)
            pipe.hdel(f"{self.ns}:excl", job)
            pipe.hdel(f"{self.ns}:wclass", job)
            pipe.execute()
        self.release([job])

    def instance_config(self, name: str) -> InstanceConfig | None:
        """The instance's registry row as last pushed into Redis (changes land here first)."""
        row = self.redis.hget(self._inst(name), "config")
        return InstanceConfig.model_validate_json(row) if row else None

    def is_registered(self, name: str) -> bool:
        return bool(self.redis.hexists(self._inst(name), "capacity"))

    def reclaim_expired(self) -> int:
        """Free slots whose grant nobody used in time; returns how many leases expired."""
        return self._reclaim(args=[self.ns, time.time(), get_settings().grant_lease])

    def release(self, jobs: list[str]) -> None:
        """Free the slots these jobs hold, without recording an outcome."""
        if jobs:
            self._reclaim(args=[self.ns, time.time(), get_settings().grant_lease, *jobs])

    def waiting(self, model: str) -> int:
        return self.redis.zcard(f"{self.ns}:wait:{model}")


def _stats(name: str, row: dict[str, str], stale_after: float) -> InstanceStats:
    return InstanceStats(
        name=name,
        capacity=int(row.get("capacity", 0)),
        in_flight=int(row.get("in_flight", 0)),
        models=frozenset(json.loads(row.get("models", "[]"))),
        loaded=frozenset(json.loads(row.get("loaded", "[]"))),
        enabled=row.get("enabled") == "1",
        healthy=row.get("healthy", "1") == "1",
        down_until=float(row.get("down_until", 0)),
        weight=float(row.get("weight", 1)),
        role=row.get("role", "both"),
        ewma_ms=float(row.get("ewma_ms", 0)),
        model_ewma_ms={k[5:]: float(v) for k, v in row.items() if k.startswith("ewma:")},
        load_ms={k[5:]: float(v) for k, v in row.items() if k.startswith("load:")},
        recent_errors=int(row.get("errors", 0)),
        host_pressure=float(row.get("host_pressure", 0)),
        host_cpu=float(row.get("host_cpu", 0)),
        host_mem=float(row.get("host_mem", 0)),
        probe_ms=float(row.get("probe_ms", 0)),
        expires_at=float(row.get("last_seen", 0)) + stale_after,
        breaker=row.get("breaker", "closed"),
        priority=int(row.get("priority", 5)),
    )


def fleet_state() -> FleetState:
    s = get_settings()
    return _fleet_state(s.redis_url, s.namespace)


@lru_cache(maxsize=8)
def _fleet_state(url: str, namespace: str) -> FleetState:
    # One per Redis and namespace: the job path asks for it many times per job, and each new
    # one would hash its scripts again.
    return FleetState(redis_client(url), namespace)
