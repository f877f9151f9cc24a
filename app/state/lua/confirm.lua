-- Before an instance worker runs a job: does the job hold a slot on this instance, and is
-- this not a second delivery of it? (app.state.slots.Slots.confirm)
-- KEYS: done(job), grants, running, leases
-- ARGV: job, instance, token, now, lease
local done, grants, running, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job, inst, token = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', done) == 1 then return 'done' end
if redis.call('HGET', grants, job) ~= inst then return 'nogrant' end
if redis.call('HGET', running, job) == token then return 'dup' end
redis.call('HSET', running, job, token)
redis.call('ZADD', leases, tonumber(ARGV[4]) + tonumber(ARGV[5]), job)
return 'ok'
