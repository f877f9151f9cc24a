-- A batched embed call takes in waiting embed jobs of its model that may ride in it
-- (app.state.batches.Batches.take). In score order (the order the hand-off would serve
-- them), a waiter rides if it offered to (same batch key), its inputs fit in the room left,
-- this instance is not excluded for it and its class has no cap (a rider holds no slot, so
-- a bulkhead could not count it). A rider stops being a waiter and is told so on its
-- hand-off list, where its router thread is blocked.
--
-- KEYS: waiters(model), batch_offers, excluded, batch_riders, waiter_class
-- ARGV: leader job, instance, batch key, room (inputs), depth (waiters looked at),
--       inputs prefix, handoff prefix, marker, ttl
-- Dynamic keys: each rider's inputs and hand-off list (prefix .. job), as in handoff.lua.
-- Returns {job1, inputs1, job2, inputs2, ...}.

local waiters, offers, excl, riders, wclass = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local leader, inst, key = ARGV[1], ARGV[2], ARGV[3]
local room, depth = tonumber(ARGV[4]), tonumber(ARGV[5])
local inputs_prefix, handoff_prefix, marker, ttl = ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])

local taken = {}
if room <= 0 then return taken end
for _, job in ipairs(redis.call('ZRANGE', waiters, 0, depth - 1)) do
  local offer = redis.call('HGET', offers, job)
  if offer then
    local bar = string.find(offer, '|', 1, true)
    local count = tonumber(string.sub(offer, bar + 1))
    local ex = redis.call('HGET', excl, job)
    if string.sub(offer, 1, bar - 1) == key and count <= room
       and (not ex or not string.find(',' .. ex .. ',', ',' .. inst .. ',', 1, true))
       and redis.call('HEXISTS', wclass, job) == 0 then
      local inputs = redis.call('GET', inputs_prefix .. job)
      if inputs then
        redis.call('ZREM', waiters, job)
        redis.call('HDEL', offers, job)
        redis.call('HDEL', excl, job)
        redis.call('HSET', riders, job, leader .. '|' .. inst)
        redis.call('RPUSH', handoff_prefix .. job, marker)
        redis.call('EXPIRE', handoff_prefix .. job, ttl)
        taken[#taken + 1] = job
        taken[#taken + 1] = inputs
        room = room - count
        if room <= 0 then break end
      end
    end
  end
end
return taken
