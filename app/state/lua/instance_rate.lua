-- An instance's own rate limit (rate_limit_per_minute; app.state.instance_rate): a token
-- bucket (bucket.lua) in the instance's hash, with `burst_seconds` of burst, taken by every
-- grant. With no token the instance counts as full. Needs: bucket.lua.

local function rate_take(inst_key, now, burst_seconds)
  local per_minute = tonumber(redis.call('HGET', inst_key, 'rate_per_minute') or '0')
  if per_minute <= 0 then return true end
  local rate = per_minute / 60
  local tokens = bucket_level(inst_key, 'rate_tokens', 'rate_at', rate,
                              math.max(1, rate * burst_seconds), now)
  if tokens < 1 then return false end
  bucket_set(inst_key, 'rate_tokens', 'rate_at', tokens - 1, now)
  return true
end
