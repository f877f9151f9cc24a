-- Idempotency keys unbound (app.state.job_keys): each key is deleted only if it is still
-- bound to the job given for it, so a key another call bound since is kept.
-- KEYS: the keys
-- ARGV: the job bound to each key, in the same order
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    released = released + redis.call('DEL', KEYS[i])
  end
end
return released
