-- Free the slots of the given jobs, or else of those whose lease expired, handing each to the
-- best waiter (app.state.slots.Slots.reclaim_expired, .release).
-- include: bucket.lua
-- include: instance_rate.lua
-- include: classes.lua
-- include: breaker.lua
-- include: handoff.lua
--
-- KEYS: grants, running, leases, instances, excluded, waiter_class, class_in_flight, job_class
-- ARGV: now, lease, burst_seconds, instance prefix, models suffix, waiters prefix,
--       handoff prefix, placement key, then the jobs (none: the expired ones)
-- Dynamic keys: the instances' hashes and model sets (which instance a job held is read from
-- the grants inside this step: instance prefix .. name, and .. models suffix), and the
-- hand-off's (see handoff.lua).
-- Returns how many jobs it looked at.

local K = {
  grants = KEYS[1], running = KEYS[2], leases = KEYS[3], instances = KEYS[4], excl = KEYS[5],
  wclass = KEYS[6], class_in_flight = KEYS[7], job_class = KEYS[8],
}
local now, lease, burst_seconds = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local instance_prefix, models_suffix = ARGV[4], ARGV[5]
local P = {waiters = ARGV[6], handoff = ARGV[7], placement = ARGV[8]}
local expired = {unpack(ARGV, 9)}
if #expired == 0 then
  expired = redis.call('ZRANGEBYSCORE', K.leases, '-inf', now, 'LIMIT', 0, 100)
end
for _, job in ipairs(expired) do
  local inst = redis.call('HGET', K.grants, job)
  redis.call('ZREM', K.leases, job)
  if inst then
    redis.call('HDEL', K.grants, job)
    redis.call('HDEL', K.running, job)
    class_give_back(K.class_in_flight, K.job_class, job)
    local inst_key = instance_prefix .. inst
    handoff(K, P, inst, inst_key, inst_key .. models_suffix, now, lease, burst_seconds)
  end
end
return #expired
