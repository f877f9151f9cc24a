"""Every Redis key Corral uses, one builder each (after ``rq/keys.py`` and ``arq/keys.py``).

Why one module: a key spelt by hand in two places drifts (one side renamed, a separator
changed) and the two sides silently stop meeting. So nothing outside ``app.state`` formats a
key; code that keeps its own Redis calls (the response cache, the token relay, the metrics
store...) takes its key names from here. The Lua scripts get their keys from here too: in
``KEYS[]``, or, where a script finds the key inside its atomic step (the waiter set of a model
read from a set, the hand-off list of the waiter it picks), as a prefix built here
(``wait(ns, "")``) to which the script appends the name.

Every key starts with the namespace (``CORRAL_NAMESPACE``), so several deployments or test
runs share one Redis; ``everything(ns)`` matches all of one namespace's keys.
"""

from __future__ import annotations


def everything(ns: str) -> str:
    """A ``SCAN``/``KEYS`` pattern matching every key of the namespace (tests, bench reset)."""
    return f"{ns}:*"


# The registry of instances ----------------------------------------------------------------


def instances(ns: str) -> str:
    # set: the names of the registered instances
    return f"{ns}:instances"


def instance(ns: str, name: str) -> str:
    # hash: an instance's registry row, slot counter, health, breaker, rate bucket, averages
    return f"{ns}:inst:{name}"


def instance_models(ns: str, name: str) -> str:
    # set: the models an instance serves
    return f"{ns}:inst:{name}:models"


def models(ns: str) -> str:
    # set: the union of every instance's models (what ``infer`` validates against)
    return f"{ns}:models"


def strategy(ns: str) -> str:
    # hash: model (or "*") -> the routing strategy set live
    return f"{ns}:strategy"


# Slots and hand-off -----------------------------------------------------------------------


def grants(ns: str) -> str:
    # hash: job -> the instance whose slot it holds
    return f"{ns}:grants"


def leases(ns: str) -> str:
    # sorted set: job -> when its grant expires unless extended
    return f"{ns}:leases"


def running(ns: str) -> str:
    # hash: job -> the token of the instance worker running it (duplicate delivery guard)
    return f"{ns}:running"


def done(ns: str, job: str) -> str:
    # string: set (with a TTL) once the job finished; a late acquire gets ``DONE``
    return f"{ns}:done:{job}"


def handoff(ns: str, job: str) -> str:
    # list: the instance a finishing job handed its slot to, popped by the waiting router
    return f"{ns}:handoff:{job}"


def waiters(ns: str, model: str) -> str:
    # sorted set: jobs waiting for a slot of the model, by tier, priority, arrival
    return f"{ns}:wait:{model}"


def excluded(ns: str) -> str:
    # hash: waiting job -> comma-separated instances it must not be handed (they failed it)
    return f"{ns}:excl"


# Batched embeddings (app.state.batches) ---------------------------------------------------


def batch_offers(ns: str) -> str:
    # hash: waiting embed job -> "<batch key>|<input count>": it may ride in another's call
    return f"{ns}:batch_offers"


def batch_inputs(ns: str, job: str) -> str:
    # string: the JSON list of a waiting embed job's inputs, read by the batch that takes it
    return f"{ns}:batch_inputs:{job}"


def batch_riders(ns: str) -> str:
    # hash: embed job taken into another's call -> "<leader job>|<instance>"
    return f"{ns}:batch_riders"


def batch_reply(ns: str, job: str) -> str:
    # list: the answer (or "run alone") the batch's leader pushes to a rider
    return f"{ns}:batch_reply:{job}"


# Class caps (bulkheads) -------------------------------------------------------------------


def class_in_flight(ns: str) -> str:
    # hash: agent class -> slots its jobs hold now
    return f"{ns}:class_in_flight"


def job_class(ns: str) -> str:
    # hash: granted job of a capped class -> its class (given back with the grant)
    return f"{ns}:job_class"


def waiter_class(ns: str) -> str:
    # hash: waiting job of a capped class -> "class|cap"
    return f"{ns}:wclass"


# Rate limits (token buckets) --------------------------------------------------------------


def rate_global(ns: str) -> str:
    # hash (tokens, at): the bucket every job takes from (global_rate_per_minute)
    return f"{ns}:rate:global"


def rate_class(ns: str, agent_class: str) -> str:
    # hash (tokens, at): an agent class's bucket
    return f"{ns}:rate:class:{agent_class}"


def rate_agent(ns: str, agent: str) -> str:
    # hash (tokens, at): one agent's bucket
    return f"{ns}:rate:agent:{agent}"


def rate_all(ns: str) -> str:
    """A pattern matching every rate-limit bucket (tests reset them)."""
    return f"{ns}:rate:*"


# Policy -----------------------------------------------------------------------------------


def policy(ns: str) -> str:
    # string: the live policy (JSON), mirrored from the database
    return f"{ns}:policy"


def policy_turn(ns: str) -> str:
    # string with a TTL: which process syncs the policy from the database this heartbeat
    return f"{ns}:policy:turn"


def degradation(ns: str) -> str:
    # hash: the degradation level, its reason, an override, the interactive wait average
    return f"{ns}:degradation"


def degradation_turn(ns: str) -> str:
    # string with a TTL: which router evaluates the degradation level this heartbeat
    return f"{ns}:degradation:turn"


def agent_jobs(ns: str, tier: str, agent: str) -> str:
    # sorted set: an agent's outstanding jobs in a tier, by submission time (fairness)
    return f"{ns}:agent_jobs:{tier}:{agent}"


# Jobs -------------------------------------------------------------------------------------


def job_key(ns: str, key: str) -> str:
    # string with a TTL: an idempotency key -> the job submitted with it
    return f"{ns}:jobkey:{key}"


def cache(ns: str, digest: str) -> str:
    # string with a TTL: a cached response (JSON) by request digest
    return f"{ns}:cache:{digest}"


def cache_flight(ns: str, digest: str) -> str:
    # string with a TTL: the job computing the response of a digest right now
    return f"{ns}:flight:{digest}"


def relay(ns: str, job: str) -> str:
    # stream: a job's tokens as they are generated, read by the gateway
    return f"{ns}:relay:{job}"


def failures(ns: str) -> str:
    # list: the most recent failed attempts (JSON), newest first
    return f"{ns}:failures"


def batch_done(ns: str, schedule: str) -> str:
    # hash: a batch schedule's done inputs
    return f"{ns}:batch:{schedule}:done"


def metrics(ns: str, name: str) -> str:
    # hash: one shared metric, labels (JSON) -> value
    return f"{ns}:metrics:{name}"


def placement(ns: str) -> str:
    # hash, with a TTL: the last placement plan a router made, instance -> the models it
    # should hold (a JSON list); for the dashboard and `corral fleet list`, and read field by
    # field by every slot hand-off (lua/handoff.lua), which needs its own instance's only
    return f"{ns}:placement"


def placement_arriving(ns: str) -> str:
    # string (JSON), with the same TTL, written with placement(ns): the models the plan
    # switched each instance to and not reported loaded yet, with when it decided each
    # switch: what the instance's worker unloads and preloads for
    return f"{ns}:placement:arriving"


def placement_nudge(ns: str, instance: str) -> str:
    # list: pushed by a router whose plan moved a model with urgent jobs onto the instance,
    # popped (BLPOP) by the instance's worker, which then acts on the plan at once instead of
    # at its next heartbeat (app.jobs.model_swap)
    return f"{ns}:placement:nudge:{instance}"


# Gateway ----------------------------------------------------------------------------------


def gateway_anchor(ns: str) -> str:
    # pub/sub channel: keeps the result watcher's subscription alive
    return f"{ns}:gateway:anchor"


def gateway_job(ns: str, job_id: str) -> str:
    # hash: a job submitted through /jobs: its owner, request, revoked flag
    return f"{ns}:gateway:job:{job_id}"
