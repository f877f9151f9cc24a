"""Batched embeddings: waiting embed jobs that ride in the call of a job holding a slot.

An embed job that has to wait for a slot *offers* itself (its batch key, its inputs). A job
of the same model and batch key that holds a slot on an instance *takes* offered waiters into
its call (``lua/take_riders.lua``, one atomic step with the waiter set, so a waiter is either
handed a slot or taken into a batch, never both), tells each rider on its hand-off list
(``BATCHED``), and later pushes each rider its own answer (``reply``). The rider's router thread
waits for that answer, and ``leave`` clears what the ride left behind. Riders hold no slot:
the call they ride in is one request in flight on the leader's slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis

from app.state import keys
from app.state.scripts import script
from app.state.slots import BATCHED

#: Seconds an offer's inputs, a hand-off marker and a reply outlive a router that died.
TTL_S = 3600
#: Waiters of the model looked at, in score order, for riders.
TAKE_DEPTH = 256


@dataclass(frozen=True)
class Batches:
    redis: redis.Redis
    ns: str

    def offer(self, job: str, batch_key: str, inputs: list[str]) -> None:
        """A waiting embed job may ride in a batch of ``batch_key``."""
        with self.redis.pipeline() as pipe:
            pipe.set(keys.batch_inputs(self.ns, job), json.dumps(inputs), ex=TTL_S)
            pipe.hset(keys.batch_offers(self.ns), job, f"{batch_key}|{len(inputs)}")
            pipe.execute()

    def withdraw(self, job: str) -> None:
        """The job got a slot of its own (or left): no batch may take it any more."""
        with self.redis.pipeline() as pipe:
            pipe.hdel(keys.batch_offers(self.ns), job)
            pipe.delete(keys.batch_inputs(self.ns, job))
            pipe.execute()

    def take(
        self, leader: str, instance: str, model: str, batch_key: str, room: int
    ) -> list[tuple[str, list[str]]]:
        """Take offered waiters of ``model`` into ``leader``'s call on ``instance``, most
        urgent first, up to ``room`` inputs; returns each rider with its inputs."""
        ns = self.ns
        flat = script(self.redis, "take_riders.lua")(
            keys=[
                keys.waiters(ns, model),
                keys.batch_offers(ns),
                keys.excluded(ns),
                keys.batch_riders(ns),
                keys.waiter_class(ns),
            ],
            args=[
                leader,
                instance,
                batch_key,
                room,
                TAKE_DEPTH,
                keys.batch_inputs(ns, ""),
                keys.handoff(ns, ""),
                BATCHED,
                TTL_S,
            ],
        )
        pairs = cast(list[str], flat)
        return [(pairs[i], json.loads(pairs[i + 1])) for i in range(0, len(pairs), 2)]

    def reply(self, answers: dict[str, dict[str, Any]]) -> None:
        """Give each rider its answer (or ``{"ok": false}``: run alone), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job, answer in answers.items():
                pipe.rpush(keys.batch_reply(self.ns, job), json.dumps(answer))
                pipe.expire(keys.batch_reply(self.ns, job), TTL_S)
            pipe.execute()

    def wait_reply(self, job: str, timeout: float) -> dict[str, Any] | None:
        """Block until the rider's answer comes, or ``timeout`` passes."""
        got = self.redis.blpop([keys.batch_reply(self.ns, job)], timeout=timeout)
        return cast(dict[str, Any], json.loads(got[1])) if got else None

    def leader_running(self, job: str) -> bool:
        """Does the job whose call ``job`` rides in still hold its slot? (A leader whose worker
        died loses its grant when the lease runs out; its riders then go back to waiting.)"""
        ride = cast(str | None, self.redis.hget(keys.batch_riders(self.ns), job))
        if ride is None:
            return False
        leader, _, instance = ride.partition("|")
        return bool(self.redis.hget(keys.grants(self.ns), leader) == instance)

    def leave(self, job: str) -> dict[str, Any] | None:
        """The rider is done riding: clear its marks, atomically with taking an answer that
        came meanwhile (returned, or None)."""
        ns = self.ns
        with self.redis.pipeline() as pipe:
            pipe.lpop(keys.batch_reply(ns, job))
            pipe.hdel(keys.batch_riders(ns), job)
            pipe.delete(keys.handoff(ns, job), keys.batch_reply(ns, job))
            pipe.hdel(keys.batch_offers(ns), job)
            pipe.delete(keys.batch_inputs(ns, job))
            late = pipe.execute()[0]
        return cast(dict[str, Any], json.loads(late)) if late else None
