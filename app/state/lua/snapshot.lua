-- The routers' reading of the fleet (app.state.instances.Instances.snapshot), in one round
-- trip: the live strategy overrides, how many jobs wait for a slot of the model being routed
-- (current, for `smart`'s end game), and every listed instance's hash.
-- KEYS: instances, strategy, waiters(model)
-- ARGV: instance key prefix (app.state.keys.instance with an empty name)
-- Dynamic keys: each instance's hash, from the list (see handoff.lua for why).
-- Returns {strategy pairs, waiting, name1, pairs1, name2, pairs2, ...}; an instance whose
-- hash is gone (removed mid-read) comes with no pairs.
local out = {redis.call('HGETALL', KEYS[2]), redis.call('ZCARD', KEYS[3])}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = name
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. name)
end
return out
