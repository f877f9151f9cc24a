"""The fleet's live state in Redis, one object per Redis and namespace.

``fleet_state()`` is the way in: a :class:`FleetState` holds one object per concern, and
callers use those (``fleet_state().slots.acquire(...)``,
``fleet_state().instances.snapshot()``); of its own it only checks that Redis answers
(``ping``) and clears a namespace (``clear``). Built once per Redis and namespace, because the
job path asks for it many times per job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

import redis
from redis.client import Pipeline

from app.settings import get_settings
from app.state import keys
from app.state.averages import EWMA_ALPHA, Averages
from app.state.batches import Batches
from app.state.breaker import Breaker
from app.state.buckets import TokenBuckets
from app.state.classes import ClassCaps
from app.state.client import redis_client
from app.state.degradation import DegradationState
from app.state.fairness import FairnessCounters
from app.state.instance_rate import InstanceRate
from app.state.instances import Instances
from app.state.job_keys import JobKeys
from app.state.placement import PlacementShown
from app.state.policy import PolicyInForce
from app.state.scripts import pipelined
from app.state.slots import BATCHED, DONE, Confirmation, Slots

__all__ = [
    "BATCHED",
    "DONE",
    "EWMA_ALPHA",
    "Confirmation",
    "FleetState",
    "fleet_state",
    "redis_client",
]


@dataclass
class FleetState:
    """The state layer's objects for the keys under one namespace."""

    redis: redis.Redis
    ns: str
    #: The registry of instances: their rows, health, learned timings; the routers' snapshot.
    instances: Instances = field(init=False)
    #: Slots and hand-off: acquire, wait, confirm, finish, hold, reclaim, release.
    slots: Slots = field(init=False)
    #: Batched embeddings: waiting embed jobs offered to, and taken into, others' calls.
    batches: Batches = field(init=False)
    #: Each instance's circuit breaker.
    breaker: Breaker = field(init=False)
    #: Each instance's own rate limit.
    rate: InstanceRate = field(init=False)
    #: Slots held per capped agent class (bulkheads).
    classes: ClassCaps = field(init=False)
    #: Token buckets (the agent, class and global rate limits).
    buckets: TokenBuckets = field(init=False)
    #: Moving averages folded into hash fields.
    averages: Averages = field(init=False)
    #: Idempotency keys bound to the first job submitted with them.
    job_keys: JobKeys = field(init=False)
    #: The last placement plan a router made, for people to see.
    placement: PlacementShown = field(init=False)
    #: The degradation level's hash and its evaluation turn.
    degradation: DegradationState = field(init=False)
    #: Each agent's outstanding jobs per tier (fairness).
    fairness: FairnessCounters = field(init=False)
    #: The rate-limit policy in force, and its refresh turn.
    policy: PolicyInForce = field(init=False)

    def __post_init__(self) -> None:
        self.averages = Averages(self.redis)
        self.instances = Instances(self.redis, self.ns, self.averages)
        self.breaker = Breaker(self.redis, self.ns)
        self.rate = InstanceRate(self.redis, self.ns)
        self.classes = ClassCaps(self.redis, self.ns)
        self.buckets = TokenBuckets(self.redis)
        self.slots = Slots(self.redis, self.ns, self.breaker, self.rate)
        self.batches = Batches(self.redis, self.ns)
        self.job_keys = JobKeys(self.redis, self.ns)
        self.placement = PlacementShown(self.redis, self.ns)
        self.degradation = DegradationState(self.redis, self.ns, self.averages)
        self.fairness = FairnessCounters(self.redis, self.ns)
        self.policy = PolicyInForce(self.redis, self.ns)

    def start_job(
        self, job: str, instance: str, token: str, model: str
    ) -> tuple[Confirmation, dict[str, float | bool | None]]:
        """Before a call: confirm the job's slot (``Slots.confirm``) and read what silence
        learned of the model there (``Instances.silence_stats``), in one round trip."""

        def queue(pipe: Pipeline) -> None:
            self.slots.confirm(job, instance, token, client=pipe)
            self.instances.read_silence_stats(instance, model, client=pipe)

        verdict, raw = pipelined(self.redis, queue)
        return cast(Confirmation, verdict), self.instances.parse_silence_stats(model, raw)

    def ping(self) -> None:
        """Check that Redis answers (raises ``redis.RedisError`` if not)."""
        self.redis.ping()

    def clear(self, namespace: str | None = None) -> None:
        """Delete every key of the namespace (this one by default): a bench or test reset."""
        for key in self.redis.scan_iter(keys.everything(namespace or self.ns)):
            self.redis.delete(key)


def fleet_state(namespace: str | None = None, *, redis_url: str | None = None) -> FleetState:
    """The fleet state of the configured Redis and namespace (or of those given)."""
    s = get_settings()
    return _fleet_state(redis_url or s.redis_url, namespace or s.namespace)


@lru_cache(maxsize=8)
def _fleet_state(url: str, namespace: str) -> FleetState:
    return FleetState(redis_client(url), namespace)
