-- Moving averages (app.state.averages): each field of the hash becomes the exponentially
-- weighted moving average of its samples (the first sample as it is), in one atomic step, so
-- concurrent writers lose no sample.
-- KEYS: the hash
-- ARGV: alpha, then field, sample, field, sample...
local alpha = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '')
  local sample = tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], ARGV[i], old and (old * (1 - alpha) + sample * alpha) or sample)
end
return 0
