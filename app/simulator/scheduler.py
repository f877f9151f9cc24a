"""Ollama's two queues, reproduced (reference: server/sched.go, llm/llama_server.go).

* A request for a model that is loaded (and whose ``num_ctx`` matches) gets its runner at
  once and then waits on the runner's FIFO slot semaphore, which never rejects.
* Anything else goes through the bounded scheduler queue (503 when full, checked on arrival)
  served by one consumer that loads one model at a time, evicts an idle model when
  ``max_loaded_models`` is reached (shortest keep-alive, then name), and waits for a busy
  one to drain when none is idle.
* With ``memory_bytes`` set, a model must also fit: its ``size_bytes`` in the memory the
  loaded models leave.  The consumer evicts, in the same order and with the same waits,
  until it does; a model larger than the whole memory fails with Ollama's 500 at once.
* A runner counts its requests; when the last one ends its keep-alive timer starts.
* A client that leaves cancels its wait wherever it is, including the load it triggered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from .config import SimInstance, SimModel
from .protocol import FOREVER, HTTPError
from .stats import Stats

DEFAULT_NUM_CTX = 4096
"""Ollama's automatic num_ctx on a machine with less than 23 GiB of VRAM."""

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

_GIB = 1024**3


def too_big_message(needed: int, available: int) -> str:
    """Ollama's load failure when a model cannot fit even on an empty server (a 500)."""
    return (
        f"model requires more system memory ({needed / _GIB:.1f} GiB) "
        f"than is available ({available / _GIB:.1f} GiB)"
    )


log = logging.getLogger(__name__)


class Slots:
    """FIFO semaphore of a runner; ``busy`` drives the parallel slowdown.

    A release hands the slot straight to the oldest live waiter, so late arrivals cannot
    overtake the queue.  Cancelled waiters stay in the deque and are skipped on release.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.busy < self.size:
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived together with the cancellation
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy -= 1


class Runner:
    """A loaded model: what ``s.loaded[model]`` holds in Ollama."""

    def __init__(self, model: SimModel, num_ctx: int, keep_alive: float, num_parallel: int):
        self.model = model
        self.num_ctx = num_ctx
        self.keep_alive = keep_alive
        self.slots = Slots(1 if model.kind == "embed" else num_parallel)
        self.refs = 0
        self.idle_since: float | None = None  # wall clock; None until it first goes idle
        self.expiring = False
        self.unloaded = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def take(self, keep_alive: float | None) -> None:
        self.refs += 1
        if keep_alive is not None:
            self.keep_alive = keep_alive
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass(eq=False)
class _Pending:
    model: SimModel
    num_ctx: int
    keep_alive: float | None
    future: asyncio.Future[Runner]


class Scheduler:
    def __init__(self, cfg: SimInstance, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.loaded: dict[str, Runner] = {}
        self.loading: str | None = None
        self._pending: deque[_Pending] = deque()
        self._consumer_busy = False
        self._wakeup = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None
        models = {m.name: m for m in cfg.models}
        for name in cfg.preloaded:
            self.loaded[name] = Runner(models[name], DEFAULT_NUM_CTX, FOREVER, cfg.num_parallel)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def memory_used(self) -> int:
        """Bytes the loaded models hold, draining ones included: their memory is not free yet."""
        return sum(r.model.size_bytes for r in self.loaded.values())

    def _fits(self, model: SimModel) -> bool:
        memory = self.cfg.memory_bytes
        return memory is None or self.memory_used + model.size_bytes <= memory

    async def acquire(self, model: SimModel, num_ctx: int, keep_alive: float | None) -> Runner:
        """Return a runner for ``model`` with one reference taken; call ``release`` after."""
        runner = self.loaded.get(model.name)
        if runner is not None and not runner.expiring and runner.num_ctx == num_ctx:
            runner.take(keep_alive)
            return runner
        # An idle consumer takes the first entry at once, so it does not count as queued.
        room = self.cfg.max_queue + (0 if self._consumer_busy else 1)
        if len(self._pending) >= room:
            self.stats.rejected_total += 1
            raise HTTPError(503, BUSY_MESSAGE)
        future: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(model, num_ctx, keep_alive, future))
        self._wakeup.set()
        if self._consumer is None:
            self._consumer = asyncio.get_running_loop().create_task(self._consume())
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, runner: Runner) -> None:
        runner.refs -= 1
        if runner.refs:
            return
        runner.idle_since = time.time()
        if runner.expiring or runner.keep_alive <= 0:
            self._remove(runner)
        elif runner.keep_alive != FOREVER:
            loop = asyncio.get_running_loop()
            runner._timer = loop.call_later(runner.keep_alive, self._expire, runner)

    def unload(self, name: str) -> None:
        """Expire a model now, or when its last request ends (keep_alive 0, delete)."""
        runner = self.loaded.get(name)
        if runner is None:
            return
        runner.keep_alive = 0
        runner.expiring = True
        if runner.refs == 0:
            self._remove(runner)

    def _expire(self, runner: Runner) -> None:
        if runner.refs == 0:
            self._remove(runner)

    def _remove(self, runner: Runner) -> None:
        if runner._timer is not None:
            runner._timer.cancel()
        if self.loaded.get(runner.model.name) is runner:
            del self.loaded[runner.model.name]
            self.stats.event("unload", runner.model.name, time.time())
        runner.unloaded.set()

    async def _consume(self) -> None:
        """The single scheduler goroutine: FIFO, blocked during every load and eviction."""
        while True:
            while not self._pending:
                self._consumer_busy = False
                self._wakeup.clear()
                await self._wakeup.wait()
            pending = self._pending.popleft()
            self._consumer_busy = True
            try:
                await self._place(pending)
            except Exception as exc:  # keep serving the queue whatever one request did
                log.exception("simulated scheduler failed on %s", pending.model.name)
                if not pending.future.done():
                    pending.future.set_exception(exc)

    async def _place(self, pending: _Pending) -> None:
        memory = self.cfg.memory_bytes
        if memory is not None and pending.model.size_bytes > memory:
            # Evicting everything would not make room: fail now rather than wait forever,
            # and leave the loaded models alone.
            if not pending.future.done():
                message = too_big_message(pending.model.size_bytes, memory)
                pending.future.set_exception(HTTPError(500, message))
            return
        while not pending.future.done():  # done here means the client left
            runner = self.loaded.get(pending.model.name)
            if runner is not None:
                if not runner.expiring and runner.num_ctx == pending.num_ctx:
                    runner.take(pending.keep_alive)
                    pending.future.set_result(runner)
                    return
                await self._drain_and_remove(runner)  # reload with the new num_ctx
            elif len(self.loaded) >= self.cfg.max_loaded_models or not self._fits(pending.model):
                # Something is loaded: an empty server has room for one model of any size
                # up to the memory (checked above).
                victim = self._victim()
                self.stats.evictions_total += 1
                self.stats.model(victim.model.name).evictions += 1
                await self._drain_and_remove(victim)
            else:
                await self._load(pending)

    def _victim(self) -> Runner:
        """Ollama's findRunnerToUnload: first idle runner by keep-alive then name, not LRU."""
        ordered = sorted(self.loaded.values(), key=lambda r: (r.keep_alive, r.model.name))
        return next((r for r in ordered if r.refs == 0), ordered[0])

    async def _drain_and_remove(self, runner: Runner) -> None:
        runner.expiring = True
        if runner.refs == 0:
            self._remove(runner)
        await runner.unloaded.wait()

    async def _load(self, pending: _Pending) -> None:
        """Load for ``load_seconds``; abort if the triggering client leaves meanwhile."""
        model = pending.model
        seconds = model.load_seconds / self.cfg.speed * self.cfg.slow_factor
        self.loading = model.name
        began = time.time()
        try:
            if seconds > 0:
                await asyncio.wait({pending.future}, timeout=seconds)
        finally:
            self.loading = None
        if pending.future.done():
            return
        keep_alive = (
            self.cfg.keep_alive_seconds if pending.keep_alive is None else pending.keep_alive
        )
        if keep_alive < 0:
            keep_alive = FOREVER
        runner = Runner(model, pending.num_ctx, keep_alive, self.cfg.num_parallel)
        self.loaded[model.name] = runner
        self.stats.loads_total += 1
        self.stats.model(model.name).loads += 1
        self.stats.event("load", model.name, began, time.time())
        runner.take(None)
        pending.future.set_result(runner)
