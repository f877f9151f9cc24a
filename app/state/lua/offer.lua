-- Offer an instance's idle slots to the waiters of models a new placement plan moved onto it
-- (app.state.slots.Slots.offer). A slot is otherwise handed to a waiter only when a job frees
-- it (finish.lua): on a box the plan just moved to a model, idle because the model it held
-- ran out of work, the model's waiting jobs would only find the slot at their next look at
-- the fleet, up to a second later (app.jobs.router.WAIT_POLL_SECONDS).
-- include: bucket.lua
-- include: instance_rate.lua
-- include: classes.lua
-- include: breaker.lua
-- include: handoff.lua
--
-- KEYS: grants, leases, instances, excluded, waiter_class, class_in_flight, job_class
-- ARGV: now, lease, burst_seconds, instance prefix, models suffix, waiters prefix,
--       handoff prefix, placement key, then per instance: its name, how many models follow,
--       those models
-- Dynamic keys: the instances' hashes and model sets (instance prefix .. name, and .. models
-- suffix), and the hand-off's (see handoff.lua).
-- Returns how many slots were handed to a waiter.

local K = {
  grants = KEYS[1], leases = KEYS[2], instances = KEYS[3], excl = KEYS[4], wclass = KEYS[5],
  class_in_flight = KEYS[6], job_class = KEYS[7],
}
local now, lease, burst_seconds = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local instance_prefix, models_suffix = ARGV[4], ARGV[5]
local P = {waiters = ARGV[6], handoff = ARGV[7], placement = ARGV[8]}
local handed = 0
local i = 9
while i <= #ARGV do
  local inst, n = ARGV[i], tonumber(ARGV[i + 1])
  local only = {}
  for j = 1, n do only[ARGV[i + 1 + j]] = true end
  i = i + 2 + n
  local inst_key = instance_prefix .. inst
  -- One slot at a time, as a finishing job frees it: the hand-off takes the slot back
  -- (in_flight - 1) when no waiter may have it, and the offer ends there.
  -- A removed instance keeps no counters (the hand-off returns at once, taking nothing back).
  local slots = 0
  if redis.call('SISMEMBER', K.instances, inst) == 1 then
    slots = tonumber(redis.call('HGET', inst_key, 'capacity') or '0')
  end
  for _ = 1, slots do
    local in_flight = tonumber(redis.call('HGET', inst_key, 'in_flight') or '0')
    if in_flight >= slots then break end
    redis.call('HINCRBY', inst_key, 'in_flight', 1)
    if not handoff(K, P, inst, inst_key, inst_key .. models_suffix, now, lease, burst_seconds,
                   only) then
      break
    end
    handed = handed + 1
  end
end
return handed
