-- Reserve a slot on the first candidate with one free, else register the job as a waiter of
-- its model (app.state.slots.Slots.acquire).
-- include: bucket.lua
-- include: instance_rate.lua
-- include: classes.lua
-- include: breaker.lua
--
-- KEYS: done(job), grants, handoff(job), leases, waiters(model), excluded, waiter_class,
--       class_in_flight, job_class, batch_riders, then instance(candidate) for each candidate
-- ARGV: job, score, now, lease, excluded_csv, class, cap (0: none), burst_seconds, then the
--       candidates' names (in the order of their keys)
-- Returns the instance, '!done' when the job already finished, '!batch' when a batched embed
-- call took it in (app.state.batches), or false (waiting).

local done, grants, handoff_key, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local waiters, excluded, wclass, class_in_flight, job_class =
  KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local job, score, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local class, cap, burst_seconds = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local riders = KEYS[10]
local FIRST = 8  -- ARGV[FIRST + i] is candidate i, KEYS[10 + i] its hash

if redis.call('EXISTS', done) == 1 then return '!done' end
-- Taken into a batch between two looks of its router: it rides there, it takes no slot.
if redis.call('HEXISTS', riders, job) == 1 then return '!batch' end
local held = redis.call('HGET', grants, job)
if held then
  redis.call('DEL', handoff_key)
  redis.call('ZADD', leases, now + lease, job)
  return held
end
local candidates = #ARGV - FIRST
if cap > 0 and class_full(class_in_flight, class, cap) then candidates = 0 end  -- at its cap
for i = 1, candidates do
  local inst, key = ARGV[FIRST + i], KEYS[10 + i]
  local v = redis.call('HMGET', key, 'in_flight', 'capacity', 'enabled', 'breaker', 'down_until')
  local breaker = v[4] or 'closed'
  local room = breaker_room(tonumber(v[2] or '0'), breaker, tonumber(v[5] or '0'), now)
  if v[3] == '1' and tonumber(v[1] or '0') < room and rate_take(key, now, burst_seconds) then
    breaker_probe(key, breaker)
    redis.call('HINCRBY', key, 'in_flight', 1)
    redis.call('HSET', grants, job, inst)
    redis.call('ZADD', leases, now + lease, job)
    redis.call('ZREM', waiters, job)
    redis.call('HDEL', excluded, job)
    redis.call('HDEL', wclass, job)
    if cap > 0 then class_take(class_in_flight, job_class, job, class) end
    return inst
  end
end
-- Not NX: a job's deadline moves when the degradation level reorders its tier.
redis.call('ZADD', waiters, score, job)
if ARGV[5] ~= '' then
  redis.call('HSET', excluded, job, ARGV[5])
else
  redis.call('HDEL', excluded, job)
end
if cap > 0 then
  redis.call('HSET', wclass, job, class .. '|' .. cap)
else
  redis.call('HDEL', wclass, job)
end
return false
