"""The agent inside an instance worker: registers its Ollama server and keeps its stats live.

An instance worker is ``celery worker -Q <ns>.instance.<name> -P threads -c <parallelism>
--prefetch-multiplier 1``. Besides running jobs, its agent thread every few seconds asks the
server what is loaded (``/api/ps``), whether it is up, and (when the fleet file does not list
the models) what it serves (``/api/tags``); it also extends the leases of the jobs it is
running, and frees slots whose lease ran out anywhere in the fleet.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field

from celery.signals import worker_ready, worker_shutdown

from app.errors import OllamaError
from app.fleet_state import fleet_state
from app.ollama_client import OllamaClient
from app.settings import InstanceConfig, get_settings, normalize_model
from app.stranded import rescue_stranded

log = logging.getLogger(__name__)

#: Re-read /api/tags every this many heartbeats when models are discovered.
DISCOVER_EVERY = 5


@dataclass
class InstanceAgent:
    config: InstanceConfig
    token: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    running: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        s = get_settings()
        self.client = OllamaClient(
            self.config.name,
            self.config.url,
            connect_timeout=s.connect_timeout,
            read_timeout=s.request_timeout,
        )
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        self._register()
        self.beat(discover=False)
        threading.Thread(target=self._loop, name=f"corral-agent-{self.name}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        # Mark the instance stale at once, so routers stop sending it jobs.
        fleet_state().redis.hset(f"{get_settings().namespace}:inst:{self.name}", "last_seen", 0)

    def job_started(self, job: str) -> None:
        with self._lock:
            self.running.add(job)

    def job_ended(self, job: str) -> None:
        with self._lock:
            self.running.discard(job)

    def _register(self) -> None:
        models = self.config.models
        if models is None:
            try:
                models = [normalize_model(m) for m in self.client.tags()]
            except OllamaError as exc:
                log.warning("cannot list models of %s yet: %s", self.name, exc)
                models = sorted(
                    fleet_state().redis.smembers(
                        f"{get_settings().namespace}:inst:{self.name}:models"
                    )
                )
        fleet_state().register(
            self.name,
            url=self.config.url,
            capacity=self.config.parallelism,
            weight=self.config.weight,
            models=models,
        )

    def beat(self, *, discover: bool) -> None:
        fleet = fleet_state()
        if not fleet.is_registered(self.name):  # Redis restarted and lost its state
            log.warning("instance %s was not registered; registering again", self.name)
            self._register()
        try:
            loaded = [normalize_model(m) for m in self.client.loaded()]
            if discover:
                fleet.set_models(self.name, [normalize_model(m) for m in self.client.tags()])
            healthy = True
        except OllamaError as exc:
            log.warning("instance %s unhealthy: %s", self.name, exc)
            loaded, healthy = [], False
        fleet.report_health(self.name, healthy=healthy, loaded=loaded)
        with self._lock:
            running = list(self.running)
        fleet.hold(self.name, self.token, running)
        fleet.reclaim_expired()
        rescue_stranded(self.name)

    def _loop(self) -> None:
        interval = get_settings().heartbeat_interval
        beats = 0
        while not self._stop.wait(interval):
            beats += 1
            discover = self.config.models is None and beats % DISCOVER_EVERY == 0
            try:
                self.beat(discover=discover)
            except Exception:  # the agent must outlive a Redis blip
                log.exception("heartbeat of %s failed", self.name)


_agent: InstanceAgent | None = None


def configure(config: InstanceConfig) -> InstanceAgent:
    """Make this process the worker of ``config``'s instance (called by ``corral worker``)."""
    from app.celery_app import celery_app, use_worker_publish_policy

    global _agent
    _agent = InstanceAgent(config)
    use_worker_publish_policy(celery_app)
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
