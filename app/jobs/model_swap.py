"""The placement plan's moves on one server: unload the model leaving, preload the one arriving.

When the plan (``routing.placement``) switches a box to a model, Ollama would, left to itself,
evict whichever loaded model its scheduler picks (the first idle one by keep-alive, then by
name: not the one the plan gave up), and load the new model only when its first job gets
there. So the instance worker, which owns all I/O with its server, acts on the plan at each
heartbeat, right after reading ``/api/ps``:

* a model loaded there that the plan no longer holds, while the plan moves another one in
  that does not fit beside it, gets ``keep_alive: 0`` (an empty prompt to /api/generate, what
  ``ollama stop`` sends): Ollama unloads it once its running requests end, and until then it
  is the first victim of any load (a keep-alive of 0 sorts first);
* a model the plan moved in (``arriving``), not loaded yet and with no job of it running there
  (a job would load it anyway), is preloaded when it has room: beside the models kept, with
  none of them idle (Ollama would evict an idle kept model before a busy leaving one). One
  preload at a time, off the heartbeat's thread, bounded by the instance's ``request_timeout``,
  and sent once per switch: it is remembered until the model shows loaded or the plan no
  longer moves it in, so a preload that failed is not sent again in a loop.

Unloads and preloads only ever follow a switch, and only once it is ``SETTLE_S`` old: a job of
the model leaving may still take a slot there until then (the hand-off follows the latest
plan, but a job being routed is ranked on its router's own plan, made up to a second before),
and it would find the model unloading and have to load it again. The jobs of the model
arriving load it themselves meanwhile, as they would without any of this. The switch must
also read the same (decided at the same time) at two heartbeats in a row: each router
process plans on its own (one per tier), the last one to plan publishes, and a switch one of
them makes and another does not is not acted on. A model the plan merely keeps is never
touched, and with no plan (none made lately: the fleet idle) nothing is sent.

A job that is about to load its model on a full server is the exception (``make_room``): the
server evicts a model for it anyway, now, and Ollama picks the first *idle* one, which is as
often a model the plan keeps (idle between two of its jobs) as the one it gave up (still
running its last ones). Evicting a kept model cost a load back, and the thrash went on from
there (issue 16's timelines: a box loaded five models in five seconds). So before such a call
the worker unloads the models the plan gave up and waits for the room: the wait is the one
Ollama would make for the model it should evict, its running requests.

What fits is what the plan uses (``routing.capacity.fits``): the server's ``max_loaded_models``
and, with ``memory_gb``, the sizes the worker learned of the models (``/api/ps``, ``/api/tags``):
a big model arriving beside two small ones kept makes the worker unload the one the plan
gave up, though the count alone would have left room.

A switch made for urgent jobs (a model loaded nowhere, its interactive job waiting) cannot
wait to settle either: the router that made it nudges the worker (``PlacementShown.nudge``),
which at once makes the room and preloads that model (``switch_now``), so the load runs while
the urgent job waits for a slot on the box rather than after it got one. A preload in progress
is shown to the routers as a job's load is (``Instances.loading``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from app.errors import OllamaError
from app.jobs.ollama_client import OllamaClient
from app.observe import metrics
from routing.capacity import fits

log = logging.getLogger(__name__)

#: Seconds an unload may take: Ollama answers it at once.
UNLOAD_TIMEOUT_S = 10.0
#: Seconds after the plan decided a switch before it is acted on: every router has planned
#: again by then (``app.jobs.placement.REPLAN_SECONDS``, plus a margin).
SETTLE_S = 1.5
#: Seconds a job that must load its model waits for the models leaving to end their running
#: requests (``make_room``), and between two looks at ``/api/ps`` meanwhile. Past the bound
#: the job goes anyway and Ollama evicts what it picks: a leaving model's long generation
#: must not hold a job's slot for minutes.
ROOM_WAIT_S = 5.0
ROOM_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Moves:
    unload: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()


def moves(
    held: frozenset[str],
    arriving: frozenset[str],
    loaded: frozenset[str],
    max_loaded: int,
    busy: frozenset[str] = frozenset(),
    sent: frozenset[str] = frozenset(),
    memory: float | None = None,
    sizes: Mapping[str, float] | None = None,
) -> Moves:
    """What to send now, given the plan for this server (``held``, ``arriving``), what its
    ``/api/ps`` lists, the models of the jobs running on it (``busy``) and the preloads
    already sent for models still arriving (``sent``); ``memory`` and ``sizes`` (bytes) as
    ``routing.capacity.fits`` takes them. At most one preload."""
    coming = arriving - loaded
    if not coming:
        return Moves()
    size_of = sizes or {}
    leaving = loaded - held
    unload = () if fits(loaded | coming, max_loaded, memory, size_of) else tuple(sorted(leaving))
    kept = loaded & held
    # A leaving model makes room for a preload only if Ollama cannot pick a kept one instead;
    # a preload sent and not answered yet takes its place.
    after = (loaded if kept - busy else kept) | (sent & coming)
    candidates = sorted(coming - busy - sent)
    preload = next((m for m in candidates if fits(after | {m}, max_loaded, memory, size_of)), None)
    return Moves(unload, () if preload is None else (preload,))


def leaving_for(
    model: str,
    held: frozenset[str],
    loaded: frozenset[str],
    max_loaded: int,
    memory: float | None = None,
    sizes: Mapping[str, float] | None = None,
) -> tuple[str, ...]:
    """The loaded models to unload before a job of ``model`` (not loaded) runs: those the plan
    no longer holds here, when ``model`` does not fit beside them all. Empty when it fits, or
    when the plan holds every loaded model (then Ollama's choice is as good as any)."""
    if model in loaded or fits(loaded | {model}, max_loaded, memory, sizes or {}):
        return ()
    return tuple(sorted(loaded - held - {model}))


@dataclass
class ModelSwap:
    """One instance's unloads and preloads, and what it remembers of them."""

    instance: str
    #: Models a preload was sent for, until they show loaded or stop arriving.
    sent: set[str] = field(default_factory=set)
    #: Models keep_alive 0 was sent for, until they leave /api/ps or the plan holds them again.
    unloading: set[str] = field(default_factory=set)
    #: Shows a preload in progress (``since``) and its end (None) to the routers, as a job's
    #: load is shown (``Instances.loading``): Ollama loads one model at a time, and the plan
    #: puts an urgent model on the box whose loads end soonest.
    show_loading: Callable[[str, float | None], None] = lambda model, since: None
    #: Models a preload is running for (its call not answered yet).
    preloading: set[str] = field(default_factory=set)
    #: The switches read at the previous heartbeat, with when they were decided.
    _seen: dict[str, float] = field(default_factory=dict)

    def step(
        self,
        plan: tuple[frozenset[str], dict[str, float]] | None,
        loaded: frozenset[str],
        max_loaded: int,
        busy: frozenset[str],
        client: OllamaClient,
        preload_timeout: float,
        now: float | None = None,
        memory: float | None = None,
        sizes: Mapping[str, float] | None = None,
    ) -> Moves:
        """Act on the plan for this server (``None``: no plan, nothing to do); ``now`` is
        wall-clock time, as the plan's times are. Returns what it sent."""
        held, switched = plan if plan is not None else (frozenset(), {})
        now = time.time() if now is None else now
        arriving = frozenset(
            m for m, at in switched.items() if now - at >= SETTLE_S and self._seen.get(m) == at
        )
        self._seen = dict(switched)
        self.sent &= frozenset(switched) - loaded
        self.unloading &= loaded - held
        if plan is None:
            return Moves()
        todo = moves(held, arriving, loaded, max_loaded, busy, frozenset(self.sent), memory, sizes)
        unload = tuple(m for m in todo.unload if m not in self.unloading)
        for model in unload:
            self._unload(client, model, "the plan moved it off")
        if self.preloading:
            return Moves(unload)  # one preload at a time: the next heartbeat looks again
        for model in todo.preload:
            self.sent.add(model)
            self.preloading.add(model)
            threading.Thread(
                target=self._preload,
                args=(client, model, preload_timeout),
                name=f"corral-preload-{self.instance}",
                daemon=True,
            ).start()
        return Moves(unload, todo.preload)

    def make_room(
        self,
        model: str,
        held: frozenset[str],
        max_loaded: int,
        client: OllamaClient,
        loaded: Callable[[], frozenset[str]],
        busy: Callable[[], frozenset[str]],
        memory: float | None = None,
        sizes: Mapping[str, float] | None = None,
    ) -> tuple[str, ...]:
        """Before a job (or a preload) of ``model`` runs here: if the server is full and
        ``model`` is not loaded, unload the models the plan (``held``) gave up, and wait until
        there is room for ``model`` (at most ``ROOM_WAIT_S``). ``loaded`` reads ``/api/ps``;
        ``busy``: the models of the jobs running here. Returns the models leaving.

        A model with a job running here and not loaded yet is being loaded (or waits for its
        load): ``/api/ps`` does not list it, yet it takes its place when its load ends, so it
        counts as held, and, if it is leaving, is unloaded once it shows loaded. Counted as
        room, a preload sent during such a load made Ollama evict a model the plan kept.

        Ollama loads one model at a time, and a request whose model is not loaded waits in
        its scheduler's queue, in order, holding up every request behind it. So a job whose
        model is being preloaded goes at once (the preload made its room), and one whose
        model is not goes after the preload of another: in Ollama's queue before it, it made
        that model's jobs wait for its own load too (an urgent job waited two loads)."""
        if model in self.preloading:
            return ()
        deadline = time.monotonic() + ROOM_WAIT_S
        now_loaded, now_busy = loaded(), busy()
        if model not in now_loaded and self.preloading:
            # A request for a loaded model skips Ollama's queue: only this one waits.
            while self.preloading and time.monotonic() < deadline:
                time.sleep(ROOM_POLL_S)
            now_loaded, now_busy = loaded(), busy()
        leaving = leaving_for(
            model, held, now_loaded | (now_busy - {model}), max_loaded, memory, sizes
        )
        while leaving:
            for name in sorted((set(leaving) & now_loaded) - self.unloading):
                self._unload(client, name, f"to make room for {model}")
            occupied = now_loaded | (now_busy - {model})
            if model in now_loaded or fits(occupied | {model}, max_loaded, memory, sizes or {}):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(ROOM_POLL_S)
            now_loaded, now_busy = loaded(), busy()
        return leaving

    def _unload(self, client: OllamaClient, name: str, why: str) -> None:
        self.unloading.add(name)  # once, even if it fails: Ollama evicts it anyway
        try:
            client.unload(name, timeout=UNLOAD_TIMEOUT_S)
        except OllamaError as exc:
            log.warning("instance %s: unloading %s failed: %s", self.instance, name, exc)
            return
        log.info("instance %s: %s unloaded (%s)", self.instance, name, why)
        metrics.unload_sent(self.instance, name)

    def switch_now(
        self,
        model: str,
        held: frozenset[str],
        arriving: frozenset[str],
        max_loaded: int,
        busy: Callable[[], frozenset[str]],
        client: OllamaClient,
        loaded: Callable[[], frozenset[str]],
        preload_timeout: float,
        memory: float | None = None,
        sizes: Mapping[str, float] | None = None,
    ) -> str | None:
        """A switch to ``model`` made for urgent jobs (the worker was nudged for it): unload
        what the plan gave up, wait for the room, and preload ``model``, now, in the caller's
        thread, not once the switch has settled. The load then runs while the urgent job
        waits for its slot, instead of after. Returns ``model`` if it was preloaded.

        ``model`` only, not whichever model arrives there first: Ollama loads one model at a
        time, and the box's other switch, preloaded here first, made the urgent job wait a
        whole load more (issue 16's cold model waited 2 s instead of 1)."""
        if model not in arriving or model in loaded() | busy() | self.sent:
            return None
        self.make_room(model, held, max_loaded, client, loaded, busy, memory, sizes)
        now_loaded, now_busy = loaded(), busy()
        if model in now_loaded | now_busy:
            return None  # a job of it loads it meanwhile
        if not fits(now_loaded | now_busy | {model}, max_loaded, memory, sizes or {}):
            return None  # the room never came
        self.sent.add(model)
        self._preload(client, model, preload_timeout)
        return model

    def _preload(self, client: OllamaClient, model: str, timeout: float) -> None:
        self.preloading.add(model)
        self.show_loading(model, time.time())
        try:
            endpoint = client.preload(model, timeout)
        except OllamaError as exc:
            log.warning("instance %s: preloading %s failed: %s", self.instance, model, exc)
            metrics.preload_sent(self.instance, model, loaded=False)
            return
        finally:
            self.preloading.discard(model)
            self.show_loading(model, None)
        log.info("instance %s: %s preloaded (/api/%s)", self.instance, model, endpoint)
        metrics.preload_sent(self.instance, model, loaded=True)
