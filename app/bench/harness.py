"""A throwaway local Corral stack, for the test suite and the benchmark.

Simulated Ollama servers, one instance worker each, and the three routers: each a subprocess
started with the production CLI, on the machine's RabbitMQ and Redis, under the namespace in
``env``. Every process is stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import requests
from redis import RedisError

from app.bench.stack import Child
from app.settings import TIERS, get_settings, normalize_model
from routing.capacity import GIB

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def sim_fleet_toml(instances: list[dict[str, Any]]) -> str:
    """The simulator's fleet file (see ``app.simulator``) for plain dict specs."""
    lines = []
    for inst in instances:
        lines.append("[[instance]]")
        # TOML has no null: a None (``memory_bytes``) is written as the key left out.
        lines += [
            f"{k} = {_toml_value(v)}" for k, v in inst.items() if k != "models" and v is not None
        ]
        for model in inst.get("models", []):
            lines.append("[[instance.model]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


def instances_env(sims: list[dict[str, Any]]) -> str:
    """``CORRAL_INSTANCES`` for a simulated fleet: a simulator's ``memory_bytes`` is the
    instance's ``memory_gb``, as one would configure a real server's."""
    return json.dumps(
        [
            {
                "name": s["name"],
                "url": f"http://127.0.0.1:{s['port']}",
                "parallelism": s.get("num_parallel", 2),
                "max_loaded_models": s.get("max_loaded_models", 3),
            }
            | ({"memory_gb": s["memory_bytes"] / GIB} if s.get("memory_bytes") else {})
            for s in sims
        ]
    )


@dataclass
class LocalFleet:
    workdir: Path
    env: dict[str, str]
    sims: list[dict[str, Any]]
    routers: bool = True
    loglevel: str = "WARNING"
    procs: dict[str, Child] = field(default_factory=dict)

    @property
    def sim_urls(self) -> dict[str, str]:
        return {s["name"]: f"http://127.0.0.1:{s['port']}" for s in self.sims}

    def _start(self, name: str, argv: list[str]) -> None:
        child = Child(name, argv, self.env, log_dir=self.workdir)
        child.start()
        self.procs[name] = child

    def start(self, timeout: float = 90.0) -> None:
        fleet_file = self.workdir / "sim.toml"
        fleet_file.write_text(sim_fleet_toml(self.sims))
        self._start("sim", [sys.executable, "-m", "app.simulator", "--fleet", str(fleet_file)])
        for name, url in self.sim_urls.items():
            wait_until(partial(_answers, url + "/api/version"), 30, f"simulator {name}")
        for s in self.sims:
            self.start_worker(s["name"])
        if self.routers:
            for tier in TIERS:
                self.start_router(tier)
        wait_until(self.ready, timeout, "workers and routers to come up", every=0.25)

    def start_router(self, tier: str, name: str | None = None) -> None:
        """A router of ``tier``; give a ``name`` to run more than one per tier."""
        self._start(
            name or f"router-{tier}",
            [
                sys.executable,
                "-m",
                "app.cli",
                "router",
                "--tier",
                tier,
                "--loglevel",
                self.loglevel,
            ],
        )

    def start_worker(self, name: str) -> None:
        self._start(
            f"worker-{name}",
            [
                sys.executable,
                "-m",
                "app.cli",
                "worker",
                "--instance",
                name,
                "--loglevel",
                self.loglevel,
            ],
        )

    def ready(self) -> bool:
        from app.queues import route_queue
        from app.state.fleet import fleet_state

        snap = fleet_state().instances.snapshot()
        up = {i.name for i in snap.instances if i.up(snap.now) and i.models}
        if not up >= set(self.sim_urls):
            return False
        models = {normalize_model(m["name"]) for s in self.sims for m in s["models"]}
        return not self.routers or all(
            queue_counts(route_queue(m, t))[1] > 0 for m in models for t in TIERS
        )

    def stop(self) -> None:
        for child in reversed(list(self.procs.values())):
            child.stop()

    def sim_stats(self, name: str) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(self.sim_urls[name] + "/sim/stats", timeout=5).json()
        return stats

    def sim_total(self, stat: str) -> float:
        """One counter of ``/sim/stats`` summed over the simulators."""
        total: float = sum(self.sim_stats(name)[stat] for name in self.sim_urls)
        return total

    def slots_held(self) -> dict[str, int]:
        """The instances whose slot counter (in Redis) is not 0, with the count."""
        from app.state.fleet import fleet_state

        counts = {name: fleet_state().instances.in_flight(name) for name in self.sim_urls}
        return {name: n for name, n in counts.items() if n}

    def waiters(self) -> dict[str, list[str]]:
        """Jobs waiting for a slot, per model's waiter set (in Redis)."""
        from app.state.fleet import fleet_state

        return {k: [job for job, _ in w] for k, w in fleet_state().slots.waiters().items()}

    def idle(self) -> bool:
        """No slot held and no job waiting for one."""
        return not self.slots_held() and not self.waiters()

    def reset_sims(self) -> None:
        for url in self.sim_urls.values():
            requests.post(url + "/sim/reset", timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        """Every simulator back to normal: no injected errors, hangs or slowness."""
        for name in self.sim_urls:
            self.faults(
                name,
                error_rate=0,
                busy_rate=0,
                hang=False,
                mid_stream_error_rate=0,
                cut_stream_rate=0,
                slow_factor=1.0,
            )

    def faults(self, name: str, **knobs: Any) -> None:
        requests.post(self.sim_urls[name] + "/sim/faults", json=knobs, timeout=5).raise_for_status()

    def purge(self) -> None:
        """Delete the namespace's Redis keys and queues."""
        from app.celery_app import celery_app
        from app.queues import (
            batch_queue,
            broker_channel,
            dead_letter_queue,
            instance_queue,
            route_queue,
        )
        from app.state.fleet import fleet_state

        fleet_state().clear(self.env["CORRAL_NAMESPACE"])
        models = {normalize_model(m["name"]) for s in self.sims for m in s["models"]}
        queues = [instance_queue(n) for n in self.sim_urls] + [dead_letter_queue(), batch_queue()]
        queues += [route_queue(m, t) for m in models for t in TIERS]
        with celery_app.connection_for_write() as conn:
            for q in queues:
                broker_channel(conn.default_channel).queue_delete(q)


def results_of(jobs: list[Any], timeout: float) -> list[Any]:
    """Every job's result, within ``timeout`` for them all; names the jobs that did not end."""
    deadline = time.monotonic() + timeout
    while not all(j.ready() for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    unfinished = {j.id: j.state for j in jobs if not j.ready()}
    assert not unfinished, f"jobs without a result after {timeout:.0f} s: {unfinished}"
    return [j.get(timeout=1) for j in jobs]


def results_through_outages(jobs: list[Any], timeout: float) -> dict[str, Any]:
    """Each finished job's result by id, within ``timeout``, read through connections that may
    fail meanwhile (a Redis failover, a broker node down): a failed read is tried again."""
    done: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(jobs) and time.monotonic() < deadline:
        for job in jobs:
            if job.id not in done:
                try:
                    if job.ready():
                        done[job.id] = job.result
                except (RedisError, OSError):
                    pass  # the client asks again (Sentinel: where the primary is now)
        time.sleep(0.3)
    return done


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def queue_counts(queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue; (0, 0) if it is absent."""
    from app import queues

    return queues.queue_counts([queue])[queue]


def depth(queue: str) -> int:
    return queue_counts(queue)[0]


@contextmanager
def own_fleet(
    workdir: Path, sims: list[dict[str, Any]], loglevel: str = "WARNING", **env: str
) -> Iterator[LocalFleet]:
    """A fleet of its own, under its own namespace and settings (``env``): for tests that need
    settings the shared fleet does not have. This process reads the same settings meanwhile."""
    with settings_from({"CORRAL_INSTANCES": instances_env(sims), **env}):
        fleet = LocalFleet(workdir, dict(os.environ), sims, loglevel=loglevel)
        try:
            fleet.start()
            yield fleet
        finally:
            fleet.stop()
            fleet.purge()


@contextmanager
def settings_from(env: dict[str, str]) -> Iterator[None]:
    """These ``CORRAL_*`` variables in force in this process (and its Celery app) meanwhile;
    the environment as it was after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    follow_settings()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        follow_settings()


def follow_settings() -> None:
    """Settings changed in the environment: read them again, and this process's Celery app
    with them (its result backend, the arguments of the queues it declares)."""
    from app.celery_app import celery_app, celery_config

    get_settings.cache_clear()
    celery_app.config_from_object(celery_config(get_settings()), force=True)
    # Built again from the new result_backend (Celery keeps it in one of these two).
    vars(celery_app)["_backend_cache"] = None
    vars(vars(celery_app)["_local"]).pop("backend", None)
    # Its queues and router, created again with the new queue arguments.
    vars(celery_app).pop("amqp", None)
