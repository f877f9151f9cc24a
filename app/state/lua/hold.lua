-- The jobs an instance's worker is running right now (app.state.slots.Slots.hold): extends
-- their leases, and puts back any grant Redis lost (a restart without persistence), so the
-- slot count never forgets a job that is really running.
-- KEYS: instances, grants, running, instance(inst), leases
-- ARGV: instance, token, now, lease, then the jobs
-- Returns how many jobs it held.
local instances, grants, running, inst_key, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local inst, token = ARGV[1], ARGV[2]
local expiry = tonumber(ARGV[3]) + tonumber(ARGV[4])
if redis.call('SISMEMBER', instances, inst) == 0 then return 0 end
for i = 5, #ARGV do
  local job = ARGV[i]
  if redis.call('HGET', grants, job) ~= inst then
    redis.call('HSET', grants, job, inst)
    redis.call('HSET', running, job, token)
    redis.call('HINCRBY', inst_key, 'in_flight', 1)
  end
  redis.call('ZADD', leases, expiry, job)
end
return #ARGV - 4
