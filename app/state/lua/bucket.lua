-- Token buckets: the one implementation (app.state.buckets), a snippet included by every
-- script that takes a token: take.lua (the agent, class and global rate limits) and, through
-- instance_rate.lua, the slot scripts (an instance's own rate, taken in the same atomic step
-- as the slot). A bucket is two fields of a hash: its tokens, and the time they were counted.
-- It refills at `rate` tokens a second up to `burst`; a clock that went back adds nothing.

-- The bucket's tokens at `now` (unchanged in Redis).
local function bucket_level(key, tokens_field, at_field, rate, burst, now)
  local v = redis.call('HMGET', key, tokens_field, at_field)
  local tokens = tonumber(v[1] or '') or burst
  local elapsed = math.max(0, now - (tonumber(v[2] or '') or now))
  return math.min(burst, tokens + elapsed * rate)
end

-- Store the bucket's tokens as counted at `now` (below zero: reservations for the future).
local function bucket_set(key, tokens_field, at_field, tokens, now)
  redis.call('HSET', key, tokens_field, tokens, at_field, now)
end
