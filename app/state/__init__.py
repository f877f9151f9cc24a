"""The fleet-state layer: every Redis key Corral uses, and the Lua that keeps them consistent.

The rule: only this package formats a Redis key or holds Lua. Code elsewhere reads and
changes fleet state through the objects of ``fleet_state()``; code that keeps its own Redis
calls for its own data (the response cache, the token relay, the metrics store...) takes its
key names from :mod:`app.state.keys`.

Modules:

* ``keys``: one builder per Redis key, with what lives there.
* ``client``: the Redis client, one per URL per process.
* ``scripts``: loads ``lua/*.lua`` (with their ``-- include:`` snippets), registered once
  per client.
* ``fleet``: ``fleet_state()``, the facade holding one object per concern below.
* ``instances``: the registry of instances (rows, health, learned timings, the snapshot).
* ``slots``: slots and hand-off (acquire, waiters, grants, confirm, finish, hold, reclaim,
  release).
* ``breaker``: each instance's circuit breaker.
* ``instance_rate``: each instance's own rate limit (a token bucket).
* ``classes``: class caps, the bulkheads (max_in_flight per agent class).
* ``buckets``: token buckets, the one implementation (``lua/bucket.lua``) behind both the
  instance rate and the agent rate limits.
* ``averages``: moving averages folded atomically into hash fields.
* ``failures``: the fleet's most recent failed attempts.
* ``degradation``: the degradation level's hash and its evaluation turn (the rules are
  ``app.policy.degradation``'s).
* ``fairness``: each agent's outstanding jobs per tier (the rule is ``app.policy.fairness``'s).
* ``policy``: the rate-limit policy in force (JSON) and its refresh turn (parsed and cached
  by ``app.policy.live``).
* ``lua/``: the scripts; each lists its KEYS and ARGV at the top.
"""
