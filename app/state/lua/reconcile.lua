-- The slot counter of an instance must equal the grants on it (app.state.slots.Slots
-- .reconcile); anything that changed one without the other (Redis losing keys mid-job, a
-- removed instance) is undone here, each heartbeat.
-- KEYS: instances, grants, instance(inst)
-- ARGV: instance
-- Returns the counter's old value, or false when it was right.
local instances, grants, inst_key = KEYS[1], KEYS[2], KEYS[3]
local inst = ARGV[1]
if redis.call('SISMEMBER', instances, inst) == 0 then return false end
local held = 0
local all = redis.call('HGETALL', grants)
for i = 2, #all, 2 do
  if all[i] == inst then held = held + 1 end
end
local counted = tonumber(redis.call('HGET', inst_key, 'in_flight') or '0')
if counted == held then return false end
redis.call('HSET', inst_key, 'in_flight', held)
return counted
