"""Batched embeddings: embed jobs of one model go to an instance as one ``/api/embed`` call.

A GPU pays most of an embedding call once per call (reading the weights, launching the pass),
so a call of many inputs costs little more than a call of one. Corral batches without giving
up any of its per-job guarantees, with one mechanism:

* **Riders offer, leaders take.** An embed job that must wait for a slot offers itself (its
  batch key: the model and every field sent to Ollama but the inputs; and its inputs). An
  embed job that holds a slot and starts on its instance (the *leader*) takes offered waiters
  of its model and key into its call (``take``: most urgent first, up to ``embed_batch_max``
  inputs in all). When it took fewer than that and more jobs of the model are queued or
  waiting, it lingers ``embed_batch_linger_ms`` for them; an idle fleet never waits.
* **One request in flight.** The batch is one call on the leader's slot; riders hold no slot,
  so an instance never has more requests than its parallelism, and the slot counter, the
  hand-off and the breaker see one job, as before.
* **Each job its own result.** Each rider's router thread, which kept its job's message while
  it waited, gets its own slice of the answer (``reply``) and stores it under its own task id
  with its own routing metadata (instance, wait, service time, ``batch_size``,
  ``batch_leader``); its ``after_success`` hooks run there (fairness, the response cache).
  Its message is acked only then, so a leader that dies mid-call loses nothing: its riders see
  its slot go and wait for a slot again.
* **Each job its own failure.** A batch that fails (any error, a malformed answer) is split:
  every rider is told to run alone (``RouteState.alone``: it waits for a slot of its own and
  never rides or leads again) and the leader calls again with its own input alone, on the
  slot it holds. So a bad input fails only its own job, through the usual retries and dead
  letter, never a neighbour's.

Ordering is the waiters': a leader takes riders in the order the hand-off would serve them,
so interactive embed jobs ride first, and a job of another model is handed the next free slot
exactly as before. Jobs of a capped agent class (``max_in_flight``) never ride: the bulkhead
counts slots, and a rider holds none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amqp.exceptions import AMQPError
from celery import states
from kombu.exceptions import OperationalError

from app.errors import JobCancelled, OllamaError
from app.jobs.cancellation import end_revoked, is_revoked
from app.jobs.lifecycle import WHILE_WAITING, Ran, cacheable, job_id
from app.queues import instance_queue, queue_counts, route_queue
from app.schemas import Answer, InferRequest, InferResult, RouteState, RoutingInfo
from app.settings import TIERS, get_settings
from app.state.fleet import fleet_state

if TYPE_CHECKING:
    from tasks.infer import InferTask

log = logging.getLogger(__name__)

#: How often a rider looks whether its leader still holds its slot, and the job is revoked.
RIDE_POLL_S = 1.0
#: How long a rider waits for its answer beyond ``request_timeout``, before waiting again.
RIDE_GRACE_S = 30.0
#: Step of a leader's linger: how often it looks for new riders meanwhile.
LINGER_STEP_S = 0.001


def may_batch(request: InferRequest, state: RouteState, class_cap: int = 0) -> bool:
    """May this job lead a batch or ride in one?"""
    s = get_settings()
    return (
        request.kind == "embed"
        and s.embed_batching
        and not state.alone
        and class_cap == 0
        and 0 < len(request.inputs) < s.embed_batch_max
    )


# The leader: the job holding the slot takes riders and makes the call -----------------------


@dataclass
class Batch:
    """A leader's call and the riders it took in."""

    leader: str
    instance: str
    request: InferRequest
    riders: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return 1 + len(self.riders)

    def combined(self) -> InferRequest:
        """The leader's request with every rider's inputs after its own."""
        inputs = [*self.request.inputs, *(text for _, ins in self.riders for text in ins)]
        return self.request.model_copy(update={"input": inputs})

    def run(self, call: Callable[[InferRequest], Answer]) -> Answer | None:
        """Make the batched call and answer every rider; the leader's own answer, or None when
        the batch failed (every rider was told to run alone: the leader calls alone next)."""
        started = time.time()
        try:
            answer = call(self.combined())
            parts = _split(answer, [len(self.request.inputs), *(len(i) for _, i in self.riders)])
        except JobCancelled:  # the leader was revoked: its riders wait for a slot again
            self.split()
            raise
        except (OllamaError, ValueError) as exc:
            log.warning("batch of %d embed jobs failed, split to run alone: %s", self.size, exc)
            self.split()
            return None
        finished = time.time()
        fleet_state().batches.reply(
            {
                job: {
                    "ok": True,
                    "answer": part.model_dump(mode="json"),
                    "instance": self.instance,
                    "started": started,
                    "finished": finished,
                    "size": self.size,
                    "leader": self.leader,
                }
                for (job, _), part in zip(self.riders, parts[1:], strict=True)
            }
        )
        return parts[0]

    def split(self) -> None:
        fleet_state().batches.reply({job: {"ok": False} for job, _ in self.riders})


def gather(job: str, instance: str, request: InferRequest, state: RouteState) -> Batch | None:
    """Take riders into ``job``'s call; None when it runs alone (nothing to take)."""
    if not may_batch(request, state):
        return None
    s = get_settings()
    batches = fleet_state().batches
    key = request.batch_key()
    room = s.embed_batch_max - len(request.inputs)
    batch = Batch(job, instance, request)

    def take() -> None:
        nonlocal room
        riders = batches.take(job, instance, request.model, key, room)
        batch.riders += riders
        room -= sum(len(inputs) for _, inputs in riders)

    take()
    if room > 0 and s.embed_batch_linger_ms > 0 and _more_waiting(request.model):
        # Only under load: jobs of the model queued or waiting will offer within a few ms
        # (their router threads are storing their last answers, or taking them from the
        # queue); an idle fleet's lone job never waits.
        until = time.monotonic() + s.embed_batch_linger_ms / 1000
        while room > 0 and (left := until - time.monotonic()) > 0:
            time.sleep(min(LINGER_STEP_S, left))
            take()
    return batch if batch.riders else None


def _split(answer: Answer, counts: list[int]) -> list[Answer]:
    """Each job's slice of a batched answer: its own vectors, the call's timings, and a share
    of the prompt tokens by its inputs (Ollama counts them for the whole call)."""
    vectors = answer.embeddings or []
    if len(vectors) != sum(counts):
        raise ValueError(f"{len(vectors)} embeddings for {sum(counts)} inputs")
    parts, at, tokens_left = [], 0, answer.prompt_tokens
    for k, count in enumerate(counts):
        share = (
            tokens_left
            if k == len(counts) - 1
            else round(answer.prompt_tokens * count / sum(counts))
        )
        tokens_left -= share
        mine = {"embeddings": vectors[at : at + count], "prompt_tokens": share}
        parts.append(answer.model_copy(update=mine))
        at += count
    return parts


class _Queued:
    """Whether jobs of a model are queued (route queues) or waiting (Redis): the linger's
    condition. The queue depths are read at most every ``QUEUED_TTL`` seconds per model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[str, tuple[float, int]] = {}

    def __call__(self, model: str) -> bool:
        if fleet_state().slots.waiting(model) > 0:
            return True
        at, queued = self._read.get(model, (-QUEUED_TTL, 0))
        if time.monotonic() - at > QUEUED_TTL and self._lock.acquire(blocking=False):
            try:
                counts = queue_counts([route_queue(model, t) for t in TIERS])
                queued = sum(ready for ready, _ in counts.values())
                self._read[model] = (time.monotonic(), queued)
            except (OSError, OperationalError, AMQPError):
                pass  # no reading: the last one
            finally:
                self._lock.release()
        return queued > 0


#: Seconds a reading of a model's route queues is reused by the leaders of a worker.
QUEUED_TTL = 0.2
_more_waiting = _Queued()


# The rider: a waiting job taken into a batch gets its answer -----------------------------------


def ride(task: InferTask, request: InferRequest, state: RouteState) -> dict[str, Any] | None:
    """Wait, in the router thread holding the job, for the answer of the batch that took it
    in, and store it as the job's result. None when there is none: the batch failed (then
    ``state.alone`` is set, the job runs alone) or its leader is gone (it waits again)."""
    job = job_id(task)
    batches = fleet_state().batches
    until = time.monotonic() + get_settings().request_timeout + RIDE_GRACE_S
    while (reply := batches.wait_reply(job, RIDE_POLL_S)) is None:
        if is_revoked(job):
            batches.leave(job)
            end_revoked(task, request, WHILE_WAITING)
        if not batches.leader_running(job) or time.monotonic() > until:
            reply = batches.leave(job)  # an answer may have come meanwhile
            if reply is None:
                return None
            break
    batches.leave(job)
    if not reply["ok"]:
        state.alone = True
        return None
    return _store(task, request, state, reply)


def _store(
    task: InferTask, request: InferRequest, state: RouteState, reply: dict[str, Any]
) -> dict[str, Any]:
    job = job_id(task)
    instance: str = reply["instance"]
    started, finished = float(reply["started"]), float(reply["finished"])
    task.middleware.before_run(request, state, started)
    result = InferResult(
        **Answer.model_validate(reply["answer"]).model_dump(),
        id=job,
        kind=request.kind,
        model=request.model,
        routing=RoutingInfo(
            instance=instance,
            queue=instance_queue(instance),
            attempts=state.attempts + 1,
            wait_s=round(started - state.submitted_at, 6),
            service_s=round(finished - started, 6),
            finished_at=finished,
            excluded=state.excluded,
            batch_size=int(reply["size"]),
            batch_leader=reply["leader"],
        ),
    )
    stored = result.model_dump(mode="json")
    # The router stage stores no result of its own (ignore_result): this is the job's one.
    task.backend.store_result(job, stored, states.SUCCESS)
    task.request.update(
        corral_ran=Ran(
            instance,
            request.model,
            result.routing.service_s * 1000,
            request.cache_key() if cacheable(request) else None,
            held_slot=False,
        )
    )
    return stored
