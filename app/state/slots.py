"""Slots and hand-off: the counter that keeps an instance to its parallelism.

* ``acquire`` reserves a slot on the first candidate that has one, or registers the job as
  a waiter of its model (a sorted set ordered by tier, priority, then arrival);
* ``finish`` frees the slot of a finished attempt and, in the same atomic step, hands it to
  the best waiter that may use that instance, so the freed slot goes to the most urgent job,
  not to whichever router thread wakes first;
* ``offer`` hands a box's idle slots to the waiters of models a new placement plan moved
  onto it, which no finishing job would hand them;
* every grant has a lease; the instance worker extends it while the job runs (``hold``), and
  ``reclaim_expired`` frees the slots of grants nobody is using (a crashed router or worker).

Each step is one Lua script (``lua/*.lua``), so each is atomic and costs one round trip. The
breaker (:mod:`app.state.breaker`), the instance's rate (:mod:`app.state.instance_rate`) and
the class caps (:mod:`app.state.classes`) are checked in the same steps, their Lua included
into these scripts. The hand-off finds the waiter sets it looks at inside the step, so the
scripts need a single Redis, not a Redis Cluster (see ``lua/handoff.lua``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, cast

import redis
from redis.client import Pipeline

from app.settings import get_settings
from app.state import keys
from app.state.averages import EWMA_ALPHA, Averages
from app.state.breaker import Breaker
from app.state.instance_rate import InstanceRate
from app.state.scripts import evalsha_on, pipelined, script

#: A job id returned by ``acquire`` for a job that already finished.
DONE = "!done"
#: What ``acquire`` or the hand-off gives a waiting embed job that a batch took in: it rides
#: in that batch's call instead of taking a slot (``app.state.batches``).
BATCHED = "!batch"

Confirmation = Literal["ok", "dup", "nogrant", "done"]
#: Where a job is in the slot bookkeeping: running, holding a grant, waiting for one, or none.
Position = Literal["running", "granted", "waiting", "none"]


@dataclass(frozen=True)
class Slots:
    redis: redis.Redis
    ns: str
    breaker: Breaker
    rate: InstanceRate

    def _handoff_prefixes(self) -> list[str]:
        """What the hand-off builds its dynamic keys from, and the placement plan it follows
        (see ``lua/handoff.lua``)."""
        return [keys.waiters(self.ns, ""), keys.handoff(self.ns, ""), keys.placement(self.ns)]

    def acquire(
        self,
        job: str,
        model: str,
        *,
        score: float,
        candidates: list[str],
        exclude: list[str],
        agent_class: str = "default",
        class_cap: int = 0,
        now: float | None = None,
    ) -> str | None:
        """Reserve a slot on the first candidate with one free; else queue as a waiter.

        With ``class_cap``, no more than that many slots go to jobs of ``agent_class`` at once
        (a bulkhead). Returns the instance, ``DONE`` when the job already finished, ``BATCHED``
        when a batched embed call took it in, or None (waiting). Calling it again for the same
        job returns the slot it already holds.
        """
        ns = self.ns
        got = script(self.redis, "acquire.lua")(
            keys=[
                keys.done(ns, job),
                keys.grants(ns),
                keys.handoff(ns, job),
                keys.leases(ns),
                keys.waiters(ns, model),
                keys.excluded(ns),
                keys.waiter_class(ns),
                keys.class_in_flight(ns),
                keys.job_class(ns),
                keys.batch_riders(ns),
                *(keys.instance(ns, c) for c in candidates),
            ],
            args=[
                job,
                score,
                now or time.time(),
                get_settings().grant_lease,
                ",".join(exclude),
                agent_class,
                class_cap,
                self.rate.burst_seconds,
                *candidates,
            ],
        )
        return cast(str | None, got)

    def wait_handoff(self, job: str, timeout: float) -> str | None:
        """Block until a finishing job hands its slot to this one (or a batch takes it in:
        ``BATCHED``), or ``timeout`` passes."""
        got = self.redis.blpop([keys.handoff(self.ns, job)], timeout=timeout)
        return cast(str, got[1]) if got else None

    def confirm(
        self, job: str, instance: str, token: str, client: Pipeline | None = None
    ) -> Confirmation:
        """Called by the instance worker before it runs a job: does it hold the slot?

        With ``client``, the step is queued on that pipeline (run by ``scripts.pipelined``,
        which returns its answer), so the worker's reads before the call share its round trip.
        """
        ns = self.ns
        step_keys = [keys.done(ns, job), keys.grants(ns), keys.running(ns), keys.leases(ns)]
        args: list[str | float] = [job, instance, token, time.time(), get_settings().grant_lease]
        if client is not None:
            evalsha_on(client, self.redis, "confirm.lua", step_keys, args)
            return cast(Confirmation, None)
        return cast(Confirmation, script(self.redis, "confirm.lua")(keys=step_keys, args=args))

    def finish(
        self,
        job: str,
        instance: str,
        *,
        ok: bool,
        model: str = "",
        service_ms: float = 0.0,
        open_breaker: bool = False,
        cancelled: bool = False,
        timing: dict[str, float] | None = None,
    ) -> str | None:
        """Free the job's slot (handing it to the best waiter) and record the outcome.

        A success folds ``service_ms`` into the instance's service times (overall and for
        ``model``) and closes its breaker; a failure counts against it, and ``open_breaker``
        opens the breaker at once (:mod:`app.state.breaker`). A ``cancelled`` job (revoked
        while it ran) records no outcome at all. ``timing`` (the call's silence samples, see
        ``app.jobs.silence.samples``) is folded in the same round trip: the slot's next job
        waits for this step, so it makes one trip, not two.

        Idempotent: a second call for the same job does nothing. Returns the job the slot
        was handed to, if any.
        """
        s, ns = get_settings(), self.ns
        step_keys = [
            keys.grants(ns),
            keys.running(ns),
            keys.leases(ns),
            keys.done(ns, job),
            keys.instances(ns),
            keys.instance(ns, instance),
            keys.instance_models(ns, instance),
            keys.excluded(ns),
            keys.waiter_class(ns),
            keys.class_in_flight(ns),
            keys.job_class(ns),
        ]
        args = [
            job,
            instance,
            time.time(),
            s.grant_lease,
            int(ok),
            service_ms,
            model,
            int(open_breaker),
            s.result_expires,
            EWMA_ALPHA,
            self.breaker.threshold(),
            self.breaker.cooldown(),
            int(cancelled),
            self.rate.burst_seconds,
            *self._handoff_prefixes(),
        ]

        def queue(pipe: Pipeline) -> None:
            if timing:
                Averages(self.redis).fold(keys.instance(ns, instance), timing, client=pipe)
            evalsha_on(pipe, self.redis, "finish.lua", step_keys, args)

        # A second run (Redis lost the scripts) folds the timing twice: one sample, no harm.
        return cast(str | None, pipelined(self.redis, queue)[-1])

    def settle(self, job: str) -> None:
        """A job answered without a slot of its own (it rode in another job's batched call)
        is finished: a late or duplicated message of it is dropped, as after ``finish``."""
        self.redis.set(keys.done(self.ns, job), "1", ex=get_settings().result_expires)

    def hold(self, instance: str, token: str, jobs: list[str]) -> None:
        """The instance's worker is running ``jobs``: extend their leases, and put back any
        grant Redis lost (see ``lua/hold.lua``)."""
        if jobs:
            ns = self.ns
            script(self.redis, "hold.lua")(
                keys=[
                    keys.instances(ns),
                    keys.grants(ns),
                    keys.running(ns),
                    keys.instance(ns, instance),
                    keys.leases(ns),
                ],
                args=[instance, token, time.time(), get_settings().grant_lease, *jobs],
            )

    def reconcile(self, instance: str) -> int | None:
        """Set the instance's slot counter to its grants; returns the wrong count it fixed."""
        ns = self.ns
        wrong = script(self.redis, "reconcile.lua")(
            keys=[keys.instances(ns), keys.grants(ns), keys.instance(ns, instance)],
            args=[instance],
        )
        return None if wrong is None else int(wrong)

    def _handing_off(self, lua: str, extra_keys: list[str], items: list[str | int]) -> int:
        """Run a script that hands freed or idle slots on (``handoff.lua``): its keys, with
        ``extra_keys`` after the grants key; its arguments, with ``items`` at the end."""
        ns = self.ns
        instance_prefix = keys.instance(ns, "")
        models_suffix = keys.instance_models(ns, "")[len(instance_prefix) :]
        return int(
            script(self.redis, lua)(
                keys=[
                    keys.grants(ns),
                    *extra_keys,
                    keys.leases(ns),
                    keys.instances(ns),
                    keys.excluded(ns),
                    keys.waiter_class(ns),
                    keys.class_in_flight(ns),
                    keys.job_class(ns),
                ],
                args=[
                    time.time(),
                    get_settings().grant_lease,
                    self.rate.burst_seconds,
                    instance_prefix,
                    models_suffix,
                    *self._handoff_prefixes(),
                    *items,
                ],
            )
        )

    def _reclaim(self, jobs: list[str]) -> int:
        return self._handing_off("reclaim.lua", [keys.running(self.ns)], [*jobs])

    def reclaim_expired(self) -> int:
        """Free slots whose grant nobody used in time; returns how many leases expired."""
        return self._reclaim([])

    def offer(self, gained: dict[str, list[str]]) -> int:
        """Hand the idle slots of each instance to waiters of the models a new placement plan
        moved onto it (``gained``: instance -> those models), best waiter first, as a freed
        slot is handed (see ``lua/offer.lua``). Returns how many slots were handed."""
        if not gained:
            return 0
        per_instance: list[str | int] = []
        for instance, models in gained.items():
            per_instance += [instance, len(models), *models]
        return self._handing_off("offer.lua", [], per_instance)

    def release(self, jobs: list[str]) -> None:
        """Free the slots these jobs hold, without recording an outcome."""
        if jobs:
            self._reclaim(jobs)

    def forget(self, job: str, model: str) -> None:
        """A revoked job: stop waiting for a slot, and free the slot it may hold."""
        with self.redis.pipeline() as pipe:
            pipe.zrem(keys.waiters(self.ns, model), job)
            pipe.hdel(keys.excluded(self.ns), job)
            pipe.hdel(keys.waiter_class(self.ns), job)
            # An embed job's offer to ride in a batch (app.state.batches) goes with it.
            pipe.hdel(keys.batch_offers(self.ns), job)
            pipe.delete(keys.batch_inputs(self.ns, job))
            pipe.execute()
        self.release([job])

    def holder(self, job: str) -> str | None:
        """The instance whose slot the job holds, if any."""
        return cast(str | None, self.redis.hget(keys.grants(self.ns), job))

    def grants(self) -> dict[str, str]:
        """Every job holding a slot, with its instance."""
        return cast(dict[str, str], self.redis.hgetall(keys.grants(self.ns)))

    def position(self, job: str, model: str) -> Position:
        """Whether the job runs on its instance, holds a grant (on its way there), waits for
        one of ``model``'s slots, or none of these."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(keys.running(self.ns), job)
            pipe.hexists(keys.grants(self.ns), job)
            pipe.zscore(keys.waiters(self.ns, model), job)
            running, granted, waiting = pipe.execute()
        if running and granted:
            return "running"
        if granted:
            return "granted"
        return "waiting" if waiting is not None else "none"

    def waiting(self, model: str) -> int:
        """Jobs waiting for a slot of ``model``."""
        return int(self.redis.zcard(keys.waiters(self.ns, model)))

    def waiting_per_model(self, models: list[str]) -> dict[str, int]:
        """``waiting`` for several models, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(keys.waiters(self.ns, model))
            return dict(zip(models, pipe.execute(), strict=True))

    def waiting_and_urgent(self, models: list[str], due_by: float) -> dict[str, tuple[int, int]]:
        """Per model, in one round trip: the jobs waiting for a slot, and those of them whose
        virtual deadline (their waiter score, see ``app.jobs.router.waiter_score``) is before
        ``due_by``: the urgent ones."""
        with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(keys.waiters(self.ns, model))
                pipe.zcount(keys.waiters(self.ns, model), "-inf", due_by)
            counts = pipe.execute()
        return {m: (int(counts[2 * k]), int(counts[2 * k + 1])) for k, m in enumerate(models)}

    def waiters(self) -> dict[str, list[tuple[str, float]]]:
        """Every waiter set that has waiters: its key, and the jobs with their scores."""
        found: dict[str, list[tuple[str, float]]] = {}
        for key in self.redis.scan_iter(keys.waiters(self.ns, "*")):
            if jobs := self.redis.zrange(key, 0, -1, withscores=True):
                found[key] = cast(list[tuple[str, float]], jobs)
        return found
