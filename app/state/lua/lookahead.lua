-- Look-ahead (app.state.slots): beyond its free slots an instance takes `lookahead` more
-- grants: jobs that wait in its own queue (never inside Ollama) and start the moment a slot
-- frees, instead of after the hand-off's round trips and a publish. Only while its breaker
-- is closed and its worker runs exactly `capacity` threads: with more threads than slots, a
-- queued job would start beside the others. An `urgent` (interactive) job may take one grant
-- more, and its queue's priority puts it before the queued ones of lower tiers, so no
-- interactive job waits behind a look-ahead.

local function lookahead_room(capacity, threads, breaker, lookahead, urgent)
  if breaker ~= 'closed' or threads ~= capacity or lookahead <= 0 then return 0 end
  return lookahead + (urgent and 1 or 0)
end
