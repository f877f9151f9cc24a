-- Take a job's token from every rate-limit bucket that applies to it (its agent's, its
-- class's, the global one), all or none (app.state.buckets.TokenBuckets.take).
-- include: bucket.lua
--
-- KEYS: the buckets
-- ARGV: now, refuse (1/0), then rate (tokens/s) and burst per bucket
-- Returns the seconds until the job's token is due (0: now), as a string (Lua numbers would
-- be truncated to integers). With refuse=1 nothing is taken unless the job may start now;
-- else a bucket may go below zero: the queue of reservations.
local now, refuse = tonumber(ARGV[1]), ARGV[2] == '1'
local wait, level = 0, {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  level[i] = bucket_level(key, 'tokens', 'at', rate, burst, now)
  if level[i] < 1 then wait = math.max(wait, (1 - level[i]) / rate) end
end
if refuse and wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  bucket_set(key, 'tokens', 'at', level[i] - 1, now)
  redis.call('EXPIRE', key, 86400)
end
return tostring(wait)
