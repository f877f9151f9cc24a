"""The agent inside an instance worker: registers its Ollama server and keeps its stats live.

An instance worker is ``celery worker -Q <ns>.instance.<name> -P threads -c <parallelism>
--prefetch-multiplier 1``. Besides running jobs, its agent thread every few seconds asks the
server what is loaded (``/api/ps``, timed), whether it is up, and (when the registry does not
list the models) what it serves (``/api/tags``), keeping each model's size from both (for the
placement plan's memory fit, ``routing.capacity``); it reports its host's CPU and memory use,
extends the leases of the jobs it is running, frees slots whose lease ran out anywhere in the
fleet, and (one worker per heartbeat) re-pushes the rate-limit policy from the database.
With the placement plan, it also unloads the model the plan moved off its server and preloads
the one it moved on (``app.jobs.model_swap``). Every few heartbeats it re-reads its
instance's registry row and applies what changed, so an edit made any way (CLI, admin API,
SQL) needs no restart, with one exception: the worker's thread count is fixed at its start,
so a parallelism raised above it takes effect only when the worker restarts (until then the
instance gets that many jobs at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
from celery.signals import worker_ready, worker_shutdown
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis import RedisError
from sqlalchemy.exc import SQLAlchemyError

from app.errors import OllamaError
from app.jobs.call_guard import Watchdog
from app.jobs.cancellation import is_revoked
from app.jobs.model_swap import ModelSwap
from app.jobs.ollama_client import OllamaClient
from app.jobs.stranded import rescue_stranded
from app.observe import metrics
from app.policy import live
from app.settings import InstanceConfig, get_settings, normalize_model
from app.state.fleet import fleet_state

if TYPE_CHECKING:
    # Given by `corral worker` (app.cli): the job path does not open the registry itself.
    from app.fleet.registry import Registry

log = logging.getLogger(__name__)

#: Re-read /api/tags every this many heartbeats when models are discovered.
DISCOVER_EVERY = 5
#: Re-read the instance's registry row every this many heartbeats.
REREAD_EVERY = 3
#: CPU or memory use (percent) below which a host is not the bottleneck: no pressure.
PRESSURE_FROM = 50.0


def host_load() -> tuple[float, float, float]:
    """(pressure, CPU %, memory %) of this host; pressure goes from 0 at ``PRESSURE_FROM``
    to 1 when CPU or memory is saturated (the ``smart`` strategy then counts the instance
    as twice as slow)."""
    cpu = psutil.cpu_percent(interval=None)  # since the previous call: no sleep
    mem = psutil.virtual_memory().percent
    return max(0.0, max(cpu, mem) - PRESSURE_FROM) / (100 - PRESSURE_FROM), cpu, mem


@dataclass
class InstanceAgent:
    config: InstanceConfig
    registry: Registry
    token: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    #: The jobs running on the instance, with their model.
    running: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        #: The worker's thread count (celery -c), fixed for its lifetime.
        self.threads = self.config.parallelism
        #: Removed from the registry: the agent stops registering and heartbeating.
        self.removed = False
        self.client = self._client()
        #: Closes the calls of revoked jobs, and silent ones (``app.jobs.call_guard``).
        self.watchdog = Watchdog(is_revoked)
        #: What /api/ps listed at the last healthy heartbeat (None before the first): the
        #: difference with the next one is counted as loads and evictions.
        self.last_loaded: set[str] | None = None
        #: Bytes each model takes on the server: as /api/ps last listed it loaded (what it
        #: really takes, KV cache included), and, for a model not seen loaded yet, its weights
        #: on disk as /api/tags lists them. Each dict is replaced whole, never changed in place:
        #: job threads read them (``make_room``).
        self._ps_sizes: dict[str, float] = {}
        self._disk_sizes: dict[str, float] = {}
        #: Unloads and preloads that follow the placement plan (``app.jobs.model_swap``).
        self.swap = ModelSwap(self.config.name, show_loading=self._show_loading)
        self._lock = threading.Lock()
        psutil.cpu_percent(interval=None)  # the first heartbeat measures from here

    def _client(self) -> OllamaClient:
        s = get_settings()
        return OllamaClient(
            self.config.name,
            self.config.url,
            connect_timeout=s.connect_timeout,
            read_timeout=self.config.request_timeout or s.request_timeout,
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sizes(self) -> dict[str, float]:
        """Bytes each model takes on the server, as far as it told (see ``_ps_sizes``)."""
        return {**self._disk_sizes, **self._ps_sizes}

    def _learn_sizes(self, reported: dict[str, int], *, loaded: bool) -> None:
        """Sizes from /api/ps (``loaded``) or /api/tags; a size of 0 (not given) is no size."""
        sizes = {normalize_model(m): float(n) for m, n in reported.items() if n}
        if loaded:
            self._ps_sizes = {**self._ps_sizes, **sizes}
        else:
            self._disk_sizes = sizes

    def start(self) -> None:
        with suppress_instrumentation():  # registration and health checks are not jobs
            self._register()
            self.beat(discover=False)
        threading.Thread(target=self._loop, name=f"corral-agent-{self.name}", daemon=True).start()
        threading.Thread(
            target=self._follow_nudges, name=f"corral-nudges-{self.name}", daemon=True
        ).start()

    def stop(self) -> None:
        self._stop.set()
        if not self.removed:
            # Mark the instance stale at once, so routers stop sending it jobs.
            fleet_state().instances.mark_stale(self.name)

    def job_started(self, job: str, model: str = "") -> None:
        with self._lock:
            self.running[job] = model

    def job_ended(self, job: str) -> None:
        with self._lock:
            self.running.pop(job, None)

    def _register(self) -> None:
        models = self.config.models
        if models is None:
            try:
                tags = self.client.tag_sizes()
                models = [normalize_model(m) for m in tags]
                self._learn_sizes(tags, loaded=False)
            except OllamaError as exc:  # keep the models Redis has
                log.warning("cannot list models of %s yet: %s", self.name, exc)
        capacity = fleet_state().instances.register(
            self.config, threads=self.threads, models=models
        )
        if capacity < self.config.parallelism:
            log.warning(
                "instance %s: parallelism is %d but this worker runs %d threads, so it takes"
                " %d jobs at once; restart the worker (corral worker --instance %s) to use %d",
                self.name,
                self.config.parallelism,
                self.threads,
                capacity,
                self.name,
                self.config.parallelism,
            )

    def reread(self) -> None:
        """Apply the instance's registry row if it changed since the last look."""
        try:
            row = self.registry.get(self.name)
        except SQLAlchemyError as exc:  # the registry being down must not stop the fleet
            log.warning("instance %s keeps its configuration: %s", self.name, exc)
            return
        if row is None:
            if not self.removed:
                log.error(
                    "instance %s was removed from the registry: this worker gets no new jobs;"
                    " stop it (or `corral fleet add` the instance again)",
                    self.name,
                )
                self.removed = True
                fleet_state().instances.unregister(
                    self.name
                )  # the row may have been deleted by hand
            return
        if not self.removed and row == self.config:
            return
        changed = {k: v for k, v in row.model_dump().items() if getattr(self.config, k) != v}
        log.info("instance %s: registry row applied: %s", self.name, changed or "added back")
        url_or_timeout = (row.url, row.request_timeout) != (
            self.config.url,
            self.config.request_timeout,
        )
        self.config, self.removed = row, False
        if url_or_timeout:
            self.client = self._client()
        self._register()

    def beat(self, *, discover: bool, reread: bool = False) -> None:
        fleet = fleet_state()
        if reread or self.removed:
            self.reread()
        if not self.removed and not fleet.instances.is_registered(self.name):
            # Redis lost its state (restarted), or the instance was just removed.
            self.reread()
            if not self.removed:
                log.warning("instance %s was not registered; registering again", self.name)
                self._register()
        if self.removed:
            return
        started = time.perf_counter()
        try:
            ps = self.client.loaded_sizes()
            probe_ms = (time.perf_counter() - started) * 1000
            loaded = [normalize_model(m) for m in ps]
            self._learn_sizes(ps, loaded=True)
            if discover:
                tags = self.client.tag_sizes()
                fleet.instances.set_models(self.name, [normalize_model(m) for m in tags])
                self._learn_sizes(tags, loaded=False)
                fleet.instances.set_version(self.name, self.client.version())
            healthy = True
        except OllamaError as exc:
            log.warning("instance %s unhealthy: %s", self.name, exc)
            loaded, healthy, probe_ms = [], False, 0.0
        if healthy:
            self._count_placement(set(loaded))
            self._follow_plan(frozenset(loaded))
        pressure, cpu, mem = host_load()
        fleet.instances.report_health(
            self.name,
            healthy=healthy,
            loaded=loaded,
            host_pressure=pressure,
            host_cpu=cpu,
            host_mem=mem,
            probe_ms=probe_ms,
            sizes=self.sizes,
        )
        with self._lock:
            running = list(self.running)
        fleet.slots.hold(self.name, self.token, running)
        wrong = fleet.slots.reconcile(self.name)
        if wrong is not None:
            log.warning(
                "instance %s: slot counter said %d, not its grants; fixed", self.name, wrong
            )
        fleet.slots.reclaim_expired()
        rescue_stranded(self.name)
        try:
            # One worker per heartbeat re-pushes the database's policy.
            live.refresh(self.registry.policy())
        except SQLAlchemyError as exc:
            log.warning("the rate-limit policy in force stays as it is: %s", exc)

    def _count_placement(self, loaded: set[str]) -> None:
        """Count the models that appeared (loads) and disappeared (evictions) since the last
        healthy heartbeat. The first heartbeat only sets the baseline: what was loaded before
        the worker started is not a load it saw; a failed probe keeps the baseline, so an
        outage does not count as evicting everything."""
        previous, self.last_loaded = self.last_loaded, loaded
        if previous is None or previous == loaded:
            return
        metrics.placement_changed(self.name, sorted(loaded - previous), sorted(previous - loaded))

    def _follow_plan(self, loaded: frozenset[str]) -> None:
        """Unload the model the placement plan moved off this server, preload the one it
        moved on (``app.jobs.model_swap``); the plan is the last one a router published."""
        s = get_settings()
        if not (s.placement and s.placement_swaps):
            return
        with self._lock:
            busy = frozenset(self.running.values())
        self.swap.step(
            fleet_state().placement.moves(self.name),
            loaded,
            self.config.max_loaded_models,
            busy,
            self.client,
            preload_timeout=self.config.request_timeout or s.request_timeout,
            memory=self.config.memory_bytes,
            sizes=self.sizes,
        )

    def _loaded(self) -> frozenset[str]:
        """What the server lists as loaded now (``/api/ps``)."""
        return frozenset(normalize_model(m) for m in self.client.loaded())

    def _busy(self) -> frozenset[str]:
        """The models of the jobs running here now."""
        with self._lock:
            return frozenset(self.running.values())

    def _follow_nudges(self) -> None:
        """Act on an urgent switch as soon as a router nudges this instance, not at the next
        heartbeat (``ModelSwap.switch_now``)."""
        interval = get_settings().heartbeat_interval
        while not self._stop.is_set():
            try:
                model = fleet_state().placement.wait_nudge(self.name, interval)
                if model is not None:
                    with suppress_instrumentation():
                        self.switch_now(model)
            except Exception:  # the thread must outlive a Redis or server blip
                log.exception("instance %s: following a nudge failed", self.name)
                self._stop.wait(interval)

    def switch_now(self, model: str) -> None:
        s = get_settings()
        if self.removed or not (s.placement and s.placement_swaps):
            return
        plan = fleet_state().placement.moves(self.name)
        if plan is None:
            return
        try:
            self.swap.switch_now(
                model,
                plan[0],
                frozenset(plan[1]),
                self.config.max_loaded_models,
                self._busy,
                self.client,
                self._loaded,
                preload_timeout=self.config.request_timeout or s.request_timeout,
                memory=self.config.memory_bytes,
                sizes=self.sizes,
            )
        except OllamaError as exc:
            log.warning("instance %s: an urgent switch failed: %s", self.name, exc)

    def make_room(self, model: str) -> bool:
        """Before a call that loads ``model`` on a full server: unload what the placement plan
        gave up here and wait for the room (``ModelSwap.make_room``), so that Ollama does not
        evict a model the plan keeps. With no plan, or the model loaded, nothing. Returns
        whether the call will load the model (not loaded now), and if so shows the load at
        once (``Instances.loading``): the plan puts no other model on a box busy loading."""
        s = get_settings()
        if not (s.placement and s.placement_swaps):
            return False
        try:
            plan = fleet_state().placement.moves(self.name)
            if plan is None:
                return False
            self.swap.make_room(
                model,
                plan[0],
                self.config.max_loaded_models,
                self.client,
                self._loaded,
                self._busy,
                memory=self.config.memory_bytes,
                sizes=self.sizes,
            )
            loading = model not in self._loaded()
            if loading:
                self._show_loading(model, time.time())
            return loading
        # The job runs anyway: the call itself says what is wrong with the server, and the
        # plan only loses a hint.
        except (OllamaError, RedisError) as exc:
            log.warning("instance %s: making room for %s failed: %s", self.name, model, exc)
            return False

    def loaded_by(self, model: str) -> None:
        """The job that loaded ``model`` (``make_room`` said it would) ended."""
        self._show_loading(model, None)

    def _show_loading(self, model: str, since: float | None) -> None:
        """A load of ``model`` here in progress since ``since`` (None: it ended), for the
        placement plan (``Instances.loading``); the load goes on whatever Redis says."""
        with contextlib.suppress(RedisError):
            fleet_state().instances.loading(self.name, model, since)

    def _loop(self) -> None:
        interval = get_settings().heartbeat_interval
        beats = 0
        while not self._stop.wait(interval):
            beats += 1
            discover = self.config.models is None and beats % DISCOVER_EVERY == 0
            try:
                with suppress_instrumentation():
                    self.beat(discover=discover, reread=beats % REREAD_EVERY == 0)
            except Exception:  # the agent must outlive a Redis blip
                log.exception("heartbeat of %s failed", self.name)


_agent: InstanceAgent | None = None


def configure(config: InstanceConfig, registry: Registry) -> InstanceAgent:
    """Make this process the worker of ``config``'s instance (called by ``corral worker``)."""
    global _agent
    _agent = InstanceAgent(config, registry)
    return _agent


def current_agent() -> InstanceAgent | None:
    return _agent


@worker_ready.connect
def _start_agent(**_: object) -> None:
    if _agent is not None:
        _agent.start()


@worker_shutdown.connect
def _stop_agent(**_: object) -> None:
    if _agent is not None:
        _agent.stop()
