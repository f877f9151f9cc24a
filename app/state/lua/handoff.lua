-- Hand-off (app.state.slots): a slot freed on an instance goes, in the same atomic step, to
-- the most urgent waiter that may use that instance. Needs: bucket.lua, instance_rate.lua,
-- classes.lua.
--
-- Dynamic keys: which waiter sets to look at (one per model the instance serves, read from
-- its models set) and which hand-off list to push to (the waiter picked) are only known
-- inside this step, so they cannot all be declared in KEYS[]; the script appends the model or
-- job to a prefix that app.state.keys built (P.waiters, P.handoff). This is why Corral needs
-- a single Redis, not a Redis Cluster. K holds the keys the including script got in KEYS[].
--
-- The placement plan (P.placement, app.state.placement: a hash, per instance the models it
-- should hold as a JSON list) is read here too, this instance's field only: a slot goes only to a waiter of a model the latest plan
-- holds on this instance. A waiter's own list of instances is as old as its last look at
-- the fleet (up to a second), and with the plan there it was handed slots on a box the plan
-- had just moved off its model (a load back, then another load) and none on the box the
-- plan had just moved to it (idle slots). No plan, or none for this instance: no filter.
--
-- ``only`` (optional, a set of model names): look at the waiters of these models alone. The
-- offer of an idle slot to the models a new plan moved onto the instance (offer.lua) uses
-- it; a freed slot (finish.lua, reclaim.lua) goes to any model the plan holds there.

local function planned_models(P, inst)
  -- A plan written by an older Corral (a JSON string) during a rolling upgrade: no filter.
  if redis.call('TYPE', P.placement).ok ~= 'hash' then return nil end
  local raw = redis.call('HGET', P.placement, inst)
  if not raw then return nil end
  local ok, models = pcall(cjson.decode, raw)
  if not ok or type(models) ~= 'table' then return nil end
  local held = {}
  for _, m in ipairs(models) do held[m] = true end
  return held
end

local function handoff(K, P, inst, inst_key, models_key, now, lease, burst_seconds, only)
  -- A removed instance (corral fleet remove --force) keeps no counters.
  if redis.call('SISMEMBER', K.instances, inst) == 0 then return false end
  local v = redis.call('HMGET', inst_key, 'enabled', 'down_until', 'in_flight', 'capacity',
                       'breaker')
  if v[1] == '1' and tonumber(v[2] or '0') <= now and (v[5] or 'closed') == 'closed'
     and tonumber(v[3] or '0') <= tonumber(v[4] or '0') then
    local best, best_score, best_model
    local planned = planned_models(P, inst)
    for _, m in ipairs(redis.call('SMEMBERS', models_key)) do
      -- Only the models the latest plan holds here (see above).
      if (not planned or planned[m]) and (not only or only[m]) then
        -- The first waiters that may use this instance; those that may not (it failed them,
        -- their class is at its cap) are skipped. Deep enough that a free slot is not left
        -- idle behind a crowd of such waiters until the others look again (within a second).
        local w = redis.call('ZRANGE', P.waiters .. m, 0, 63, 'WITHSCORES')
        for j = 1, #w, 2 do
          local s = tonumber(w[j + 1])
          if best_score and s >= best_score then break end
          local ex = redis.call('HGET', K.excl, w[j])
          local name, cap = waiter_class(K.wclass, w[j])
          if (not ex or not string.find(',' .. ex .. ',', ',' .. inst .. ',', 1, true))
             and not (name and class_full(K.class_in_flight, name, cap)) then
            best, best_score, best_model = w[j], s, m
            break
          end
        end
      end
    end
    if best and rate_take(inst_key, now, burst_seconds) then
      local name = waiter_class(K.wclass, best)
      if name then class_take(K.class_in_flight, K.job_class, best, name) end
      redis.call('HDEL', K.wclass, best)
      redis.call('ZREM', P.waiters .. best_model, best)
      redis.call('HDEL', K.excl, best)
      redis.call('HSET', K.grants, best, inst)
      redis.call('ZADD', K.leases, now + lease, best)
      redis.call('RPUSH', P.handoff .. best, inst)
      redis.call('EXPIRE', P.handoff .. best, 3600)
      return best
    end
  end
  redis.call('HINCRBY', inst_key, 'in_flight', -1)
  return false
end
