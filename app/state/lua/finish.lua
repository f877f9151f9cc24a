-- Free the slot of a finished attempt, record its outcome, and hand the slot to the best
-- waiter, in one atomic step (app.state.slots.Slots.finish). A cancelled job (revoked while
-- it ran) ends like a finished one (its id is done) but says nothing about the instance: no
-- service time, no failure, the breaker as it was.
-- include: bucket.lua
-- include: instance_rate.lua
-- include: classes.lua
-- include: breaker.lua
-- include: handoff.lua
--
-- KEYS: grants, running, leases, done(job), instances, instance(inst),
--       instance_models(inst), excluded, waiter_class, class_in_flight, job_class
-- ARGV: job, instance, now, lease, ok (1/0), service_ms, model, open_breaker (1/0),
--       done_ttl, alpha, breaker_threshold, breaker_cooldown, cancelled (1/0),
--       burst_seconds, waiters prefix, handoff prefix, placement key
-- Dynamic keys: the hand-off's (see handoff.lua).
-- Returns the job the slot was handed to, or false.

local K = {
  grants = KEYS[1], running = KEYS[2], leases = KEYS[3], done = KEYS[4], instances = KEYS[5],
  excl = KEYS[8], wclass = KEYS[9], class_in_flight = KEYS[10], job_class = KEYS[11],
}
local inst_key, models_key = KEYS[6], KEYS[7]
local P = {waiters = ARGV[15], handoff = ARGV[16], placement = ARGV[17]}
local job, inst = ARGV[1], ARGV[2]
local now, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local ok, cancelled = ARGV[5] == '1', ARGV[13] == '1'
if redis.call('HGET', K.grants, job) ~= inst then return false end
redis.call('HDEL', K.grants, job)
class_give_back(K.class_in_flight, K.job_class, job)
redis.call('HDEL', K.running, job)
redis.call('ZREM', K.leases, job)
if ok or cancelled then
  redis.call('SET', K.done, '1', 'EX', tonumber(ARGV[9]))
end
if redis.call('SISMEMBER', K.instances, inst) == 0 then return false end
if cancelled then
  redis.call('HINCRBY', inst_key, 'cancelled', 1)
elseif ok then
  local ms, alpha = tonumber(ARGV[6]), tonumber(ARGV[10])
  for _, field in ipairs({'ewma_ms', 'ewma:' .. ARGV[7]}) do
    local old = tonumber(redis.call('HGET', inst_key, field) or '')
    redis.call('HSET', inst_key, field, old and (old * (1 - alpha) + ms * alpha) or ms)
  end
  if tonumber(redis.call('HGET', inst_key, 'errors') or '0') > 0 then
    redis.call('HINCRBY', inst_key, 'errors', -1)
  end
  redis.call('HINCRBY', inst_key, 'completed', 1)
  breaker_success(inst_key)
else
  redis.call('HINCRBY', inst_key, 'errors', 1)
  redis.call('HINCRBY', inst_key, 'failed', 1)
  breaker_failure(inst_key, ARGV[8] == '1', tonumber(ARGV[11]), tonumber(ARGV[12]), now)
end
return handoff(K, P, inst, inst_key, models_key, now, lease, tonumber(ARGV[14]))
