-- Delete a claim only if it is still ours (app.jobs.cache: the in-flight claim of a digest).
-- KEYS: the claim
-- ARGV: the owner (a job id)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
