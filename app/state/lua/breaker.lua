-- The circuit breaker of an instance (app.state.breaker): the fields breaker ('closed',
-- 'open', 'half_open') and down_until of its hash. Open: no job until the cooldown ends; then
-- half-open: one probe job at a time; the first success closes it.

-- Slots the instance offers, given its capacity and its breaker.
local function breaker_room(capacity, breaker, down_until, now)
  if breaker == 'closed' then return capacity end
  return (down_until <= now) and 1 or 0
end

-- A job was granted a slot: an open breaker whose cooldown ended lets it through as the probe.
local function breaker_probe(inst_key, breaker)
  if breaker == 'open' then redis.call('HSET', inst_key, 'breaker', 'half_open') end
end

local function breaker_success(inst_key)
  redis.call('HSET', inst_key, 'consecutive', 0, 'breaker', 'closed')
end

-- Opens after `threshold` failures in a row, at once with `open_now`, or when the half-open
-- probe failed; stays open `cooldown` seconds.
local function breaker_failure(inst_key, open_now, threshold, cooldown, now)
  local consecutive = redis.call('HINCRBY', inst_key, 'consecutive', 1)
  local was = redis.call('HGET', inst_key, 'breaker') or 'closed'
  if open_now or was == 'half_open' or consecutive >= threshold then
    redis.call('HSET', inst_key, 'breaker', 'open', 'down_until', now + cooldown)
  end
end
