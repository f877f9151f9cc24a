-- Class caps, the bulkheads (app.state.classes): slots held per agent class, for the classes
-- with a cap (max_in_flight). A job of such a class records its class when granted
-- (job_class) or when it starts waiting (waiter_class, "class|cap"), and gives the count back
-- with its grant.

local function class_full(in_flight_key, name, cap)
  return tonumber(redis.call('HGET', in_flight_key, name) or '0') >= cap
end

local function waiter_class(waiter_class_key, job)
  local c = redis.call('HGET', waiter_class_key, job)
  if not c then return nil, 0 end
  local sep = string.find(c, '|', 1, true)
  return string.sub(c, 1, sep - 1), tonumber(string.sub(c, sep + 1))
end

local function class_take(in_flight_key, job_class_key, job, name)
  redis.call('HINCRBY', in_flight_key, name, 1)
  redis.call('HSET', job_class_key, job, name)
end

local function class_give_back(in_flight_key, job_class_key, job)
  local name = redis.call('HGET', job_class_key, job)
  if name then
    redis.call('HINCRBY', in_flight_key, name, -1)
    redis.call('HDEL', job_class_key, job)
  end
end
