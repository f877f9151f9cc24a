-- Store a job's result (app.state.result_backend), in one round trip: Celery's Redis backend
-- reads the stored result first and leaves a SUCCESS alone (a redelivered or duplicated task
-- must not overwrite the answer its caller may already have), then writes and publishes; the
-- same here, atomically.
-- KEYS: the task's result key
-- ARGV: the result's meta, encoded as JSON; seconds it lives (0: no expiry)
-- Returns 1 when stored, 0 when a SUCCESS was already there.
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
