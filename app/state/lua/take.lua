-- Take a job's token from every rate-limit bucket that applies to it (its agent's, its
-- class's, the global one), all or none (app.state.buckets.TokenBuckets.take); or, for a bulk
-- call (infer.submit_many), the tokens of all its jobs at once, all or none.
-- include: bucket.lua
--
-- KEYS: the buckets
-- ARGV: now, refuse (1/0), then rate (tokens/s), burst and tokens to take, per bucket
-- Returns {the seconds until the tokens are due (0: now), as a string (Lua numbers would be
-- truncated to integers); the 1-based index of the bucket that waits longest (0: none)}. With
-- refuse=1 nothing is taken unless every token is there now; else a bucket may go below zero:
-- the queue of reservations.
local now, refuse = tonumber(ARGV[1]), ARGV[2] == '1'
local wait, longest, level = 0, 0, {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[3 * i]), tonumber(ARGV[1 + 3 * i])
  local count = tonumber(ARGV[2 + 3 * i])
  level[i] = bucket_level(key, 'tokens', 'at', rate, burst, now)
  if level[i] < count and (count - level[i]) / rate > wait then
    wait, longest = (count - level[i]) / rate, i
  end
end
if refuse and wait > 0 then return {tostring(wait), longest} end
for i, key in ipairs(KEYS) do
  bucket_set(key, 'tokens', 'at', level[i] - tonumber(ARGV[2 + 3 * i]), now)
  redis.call('EXPIRE', key, 86400)
end
return {tostring(wait), longest}
