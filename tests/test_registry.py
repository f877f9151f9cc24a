"""The fleet registry: its store and migrations on SQLite and PostgreSQL, and instances added,
changed, drained and removed live through `corral fleet`, with a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from app.bench.harness import LocalFleet, free_port, sim_fleet_toml, wait_until
from app.bench.stack import Child
from app.celery_app import celery_app
from app.errors import RetriesExhausted
from app.fleet.registry import InstanceExists, Registry, UnknownInstance
from app.migrations import head, upgrade
from app.queues import instance_queue
from app.settings import InstanceConfig, Settings
from app.state import keys
from app.state.fleet import fleet_state
from routing import InstanceStats
from tasks import infer

CHAT = "llama3.2:3b"


# The store ---------------------------------------------------------------------------------


def _query(url: str, sql: str) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)))
    finally:
        engine.dispose()


def test_upgrade_from_0001_adds_the_registry_and_keeps_keys(db_url: str) -> None:
    upgrade(db_url, "0001_api_keys")
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (prefix, key_hash, agent, agent_class, tiers, default_tier,"
                " created_at) VALUES ('crl_old', 'h', 'old', 'c', 'normal', 'normal',"
                " CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()
    upgrade(db_url)
    upgrade(db_url)  # at head: nothing to do
    assert _query(db_url, "SELECT version_num FROM alembic_version")[0][0] == head()
    assert [bool(r[0]) for r in _query(db_url, "SELECT admin FROM api_keys")] == [False]
    assert _query(db_url, "SELECT count(*) FROM instances")[0][0] == 0


def test_processes_migrating_at_once_all_succeed(db_url: str) -> None:
    env = dict(os.environ, CORRAL_DATABASE_URL=db_url)
    argv = [sys.executable, "-m", "app.cli", "db", "upgrade"]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=90)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert _query(db_url, "SELECT version_num FROM alembic_version")[0][0] == head()


def test_registry_add_get_update_remove(db_url: str) -> None:
    registry = Registry(db_url, "reg-a")
    registry.migrate()
    added = registry.add(
        InstanceConfig(name="gpu-1", url="http://gpu-1:11434/", tags=["a100"], role="chat")
    )
    assert added.url == "http://gpu-1:11434" and added.parallelism == 2
    assert registry.get("gpu-1") == added and registry.get("gpu-2") is None
    with pytest.raises(InstanceExists, match="corral fleet update gpu-1"):
        registry.add(InstanceConfig(name="gpu-1", url="http://elsewhere:1"))

    changed = registry.update("gpu-1", parallelism=4, enabled=False, models=["llama3.2"])
    assert (changed.parallelism, changed.enabled, changed.models) == (4, False, ["llama3.2:latest"])
    assert changed.tags == ["a100"] and registry.get("gpu-1") == changed
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        registry.update("gpu-1", parallelism=0)
    with pytest.raises(ValueError, match="http://"):
        registry.update("gpu-1", url="gpu-1:11434")
    with pytest.raises(UnknownInstance):
        registry.update("gpu-9", weight=2.0)

    other = Registry(db_url, "reg-b")  # another namespace: another fleet, same database
    assert other.list() == []
    other.add(InstanceConfig(name="gpu-1", url="http://b:1"))
    assert [c.url for c in registry.list()] == ["http://gpu-1:11434"]

    assert registry.upsert("gpu-1", weight=2.0).url == "http://gpu-1:11434"  # a change
    assert registry.upsert("gpu-3", url="http://gpu-3:1").parallelism == 2  # an addition
    assert registry.remove("gpu-3") is True
    assert registry.remove("gpu-1") is True and registry.remove("gpu-1") is False
    assert registry.list() == [] and [c.name for c in other.list()] == ["gpu-1"]


def test_seeding_adds_new_entries_and_the_latest_change_wins(db_url: str) -> None:
    registry = Registry(db_url, "reg-seed")
    registry.migrate()
    f1 = {"name": "f-1", "url": "http://f1:11434", "parallelism": 3}
    f2 = {"name": "f-2", "url": "http://f2:11434", "tags": ["cpu"]}
    assert registry.seed_from_settings(Settings(instances=[f1, f2])) == ["f-1", "f-2"]
    registry.update("f-1", parallelism=1)  # through the CLI: survives the next seeding
    registry.update("f-2", weight=2.0)
    moved = {**f2, "url": "http://f2-new:11434"}  # the file was edited: the file wins
    assert registry.seed_from_settings(Settings(instances=[f1, moved])) == ["f-2"]
    assert registry.get("f-1").parallelism == 1
    assert (registry.get("f-2").url, registry.get("f-2").weight) == ("http://f2-new:11434", 1.0)
    assert registry.seed_from_settings(Settings(instances=[f1, moved])) == []


def test_a_field_added_by_an_upgrade_does_not_reseed_over_live_edits(db_url: str) -> None:
    """A row seeded before a field existed (``max_loaded_models``) and edited since with
    ``corral fleet`` keeps its edit: the new field at its default is no change of the file."""
    from sqlalchemy import update

    from app.fleet.registry import Instance

    registry = Registry(db_url, "reg-upgrade")
    registry.migrate()
    f1 = {"name": "u-1", "url": "http://u1:11434"}
    assert registry.seed_from_settings(Settings(instances=[f1])) == ["u-1"]
    old_entry = {k: v for k, v in InstanceConfig(**f1).model_dump(mode="json").items()}
    old_entry.pop("max_loaded_models")  # as an older Corral stored it
    with registry._sessions.begin() as session:
        session.execute(update(Instance).where(Instance.name == "u-1").values(seeded=old_entry))
    registry.update("u-1", weight=3.0)
    assert registry.seed_from_settings(Settings(instances=[f1])) == []
    assert registry.get("u-1").weight == 3.0


# Live changes, with a real worker ----------------------------------------------------------

EXTRA_SIM = {
    "num_parallel": 2,
    "preloaded": [CHAT],
    "models": [
        {
            "name": CHAT,
            "kind": "chat",
            "tokens_per_second": 400.0,
            "default_num_predict": 8,
            "load_seconds": 0.2,
        }
    ],
}


@dataclass
class Extra:
    """A simulated Ollama server outside the session's fleet, and a registry of our own."""

    url: str
    env: dict[str, str]
    workdir: Path
    db_url: str

    def corral(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=90,
        )

    def worker(self, name: str, *args: str) -> Child:
        """``corral worker ARGS`` with our registry (not started)."""
        argv = [sys.executable, "-m", "app.cli", "worker", *args, "--loglevel", "INFO"]
        return Child(f"worker-{name}", argv, self.env, log_dir=self.workdir)

    def forget(self, name: str) -> None:
        """The instance gone from the registry, Redis and RabbitMQ."""
        Registry(self.db_url).remove(name)
        fleet_state().instances.unregister(name)
        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(instance_queue(name))

    def faults(self, **knobs: float) -> None:
        requests.post(self.url + "/sim/faults", json=knobs, timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def extra(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Extra]:
    workdir = tmp_path_factory.mktemp("extra")
    port = free_port()
    (workdir / "sim.toml").write_text(
        sim_fleet_toml([{"name": "extra", "port": port, **EXTRA_SIM}])
    )
    db_url = f"sqlite:///{workdir}/corral.db"
    env = dict(fleet.env, CORRAL_DATABASE_URL=db_url)
    sim = Child(
        "extra-sim",
        [sys.executable, "-m", "app.simulator", "--fleet", str(workdir / "sim.toml")],
        env,
        log_dir=workdir,
    )
    sim.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url + "/api/version"), 30, "the extra simulator")
        yield Extra(url, env, workdir, db_url)
    finally:
        sim.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


@contextmanager
def added_instance(extra: Extra, name: str) -> Iterator[Child]:
    """``corral fleet add`` the extra server as ``name``, yield its (unstarted) worker; after,
    stop the worker and forget the instance everywhere."""
    added = extra.corral("fleet", "add", name, "--url", extra.url, "--tags", "sim,extra")
    assert added.returncode == 0, added.stderr
    assert f"corral worker --instance {name}" in added.stdout
    worker = extra.worker(name, "--instance", name)
    try:
        yield worker
    finally:
        worker.stop()
        extra.forget(name)


def _live(name: str) -> tuple[InstanceStats | None, float]:
    snap = fleet_state().instances.snapshot()
    return next((i for i in snap.instances if i.name == name), None), snap.now


def _up(name: str) -> bool:
    inst, now = _live(name)
    return inst is not None and inst.up(now) and CHAT in inst.models


@contextmanager
def session_fleet_drained(fleet: LocalFleet) -> Iterator[None]:
    """The session's instances get no new jobs (in Redis only, as the routers see it)."""
    state = fleet_state()
    for name in fleet.sim_urls:
        state.instances.set_enabled(name, False)
    try:
        yield
    finally:
        for name in fleet.sim_urls:
            state.instances.set_enabled(name, True)


def _gen(i: int, num_predict: int = 6) -> dict:
    return {"model": CHAT, "prompt": f"registry {i}", "options": {"num_predict": num_predict}}


@pytest.mark.fleet
def test_added_instance_is_down_until_its_worker_runs_then_gets_jobs(
    healthy_fleet: LocalFleet, extra: Extra
) -> None:
    name = f"rx-{os.getpid()}"
    with added_instance(extra, name) as worker:
        inst, now = _live(name)
        assert inst is not None and not inst.up(now), "no heartbeat yet: it must count as down"
        listed = extra.corral("fleet", "list")
        assert listed.returncode == 0, listed.stderr
        assert any(line.startswith(name) and "DOWN" in line for line in listed.stdout.splitlines())

        worker.start()
        wait_until(lambda: _up(name), 60, f"{name}'s worker to register it")
        inst, _ = _live(name)
        assert 0 < inst.host_mem <= 100 and 0 <= inst.host_cpu <= 100 and inst.probe_ms > 0
        shown = extra.corral("fleet", "show", name)
        view = json.loads(shown.stdout)
        assert view["state"] == "up" and view["config"]["tags"] == ["sim", "extra"]
        assert view["live"]["host_mem"] > 0 and "host_cpu" in view["redis"]
        assert "mem" in extra.corral("fleet", "list").stdout

        with session_fleet_drained(healthy_fleet), ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: infer.delay(**_gen(i)).get(timeout=60), range(6)))
        assert {r.routing.instance for r in results} == {name}

        key = keys.instance(fleet_state().ns, name)
        lowered = extra.corral("fleet", "update", name, "--parallelism", "1")
        assert lowered.returncode == 0, lowered.stderr
        assert fleet_state().redis.hget(key, "capacity") == "1"
        raised = extra.corral("fleet", "update", name, "--parallelism", "4")
        assert "restart" in raised.stdout, raised.stdout
        assert fleet_state().redis.hget(key, "capacity") == "2"  # the worker runs 2 threads

        # An edit made straight in the database reaches Redis through the worker's agent.
        Registry(extra.db_url).update(name, weight=3.0)
        wait_until(
            lambda: fleet_state().redis.hget(key, "weight") == "3.0", 15, "the edit to apply"
        )
        # How many models it holds at once: what placement plans with (issue 16).
        held = extra.corral("fleet", "update", name, "--max-loaded-models", "1")
        assert held.returncode == 0, held.stderr
        wait_until(
            lambda: fleet_state().redis.hget(key, "max_loaded") == "1", 15, "max_loaded to apply"
        )
        assert "(holds 1)" in extra.corral("fleet", "list").stdout


@pytest.mark.fleet
def test_drain_lets_the_running_job_finish_and_remove_waits_for_it(
    healthy_fleet: LocalFleet, extra: Extra
) -> None:
    name = f"rd-{os.getpid()}"
    with added_instance(extra, name) as worker:
        worker.start()
        wait_until(lambda: _up(name), 60, f"{name}'s worker to register it")
        extra.faults(slow_factor=400.0)  # a second a token, until it is set back
        try:
            with session_fleet_drained(healthy_fleet):
                running = infer.delay(**_gen(100, num_predict=30))
                wait_until(
                    lambda: fleet_state().instances.in_flight(name) > 0, 30, "the job to start"
                )
            drained = extra.corral("fleet", "drain", name)
            assert drained.returncode == 0, drained.stderr
            refused = extra.corral("fleet", "remove", name)
            assert refused.returncode == 1 and "1 job(s) in flight" in refused.stderr
            others = [infer.delay(**_gen(i)) for i in range(4)]
            assert {j.get(timeout=60).routing.instance for j in others} <= set(
                healthy_fleet.sim_urls
            )
            assert not running.ready(), "the job must still be running after the drain"
        finally:
            extra.faults(slow_factor=1.0)
        assert running.get(timeout=60).routing.instance == name
        assert Registry(extra.db_url).get(name).enabled is False  # the drain is persisted

        removed = extra.corral("fleet", "remove", name, "--wait", "20")
        assert removed.returncode == 0, removed.stderr
        assert name not in fleet_state().instances.instance_names()
        assert Registry(extra.db_url).get(name) is None
        wait_until(
            lambda: "removed from the registry" in worker.log.read_text(errors="replace"),
            15,
            "the worker to notice its removal",
        )
        assert name not in fleet_state().instances.instance_names(), (
            "the worker must not re-register it"
        )


@pytest.mark.fleet
def test_priority_rate_limit_and_retry_attempts_of_an_instance_apply_live(
    healthy_fleet: LocalFleet, extra: Extra
) -> None:
    name = f"rp-{os.getpid()}"
    with added_instance(extra, name) as worker:
        assert extra.corral("fleet", "update", name, "--priority", "9").returncode == 0
        worker.start()
        wait_until(lambda: _up(name), 60, f"{name}'s worker to register it")

        def one_at_a_time(n: int) -> list[str]:
            return [infer.delay(**_gen(i)).get(timeout=60).routing.instance for i in range(n)]

        # The top priority level takes the light load; the session's instances (level 5) idle.
        assert one_at_a_time(4) == [name] * 4

        # 6 a minute: its one token of burst goes, then the overflow goes down a level.
        assert extra.corral("fleet", "update", name, "--rate-limit", "6").returncode == 0
        served = one_at_a_time(5)
        assert served.count(name) <= 1, served

        # One attempt in all for a job failing there: a typed error, no retry elsewhere.
        update = ("fleet", "update", name, "--rate-limit", "600", "--retry-attempts", "1")
        assert extra.corral(*update).returncode == 0
        wait_until(lambda: one_at_a_time(1) == [name], 20, "the higher rate to apply")
        extra.faults(error_rate=1.0)
        try:
            with pytest.raises(RetriesExhausted) as info:
                infer.delay(**_gen(99)).get(timeout=60)
        finally:
            extra.faults(error_rate=0.0)
        assert [h["instance"] for h in info.value.history] == [name]


@pytest.mark.fleet
def test_worker_with_ollama_url_registers_itself(healthy_fleet: LocalFleet, extra: Extra) -> None:
    name = f"rs-{os.getpid()}"
    worker = extra.worker(name, "--ollama", extra.url, "--name", name, "--parallelism", "1")
    worker.start()
    try:
        wait_until(lambda: _up(name), 60, f"{name} to register itself")
        config = Registry(extra.db_url).get(name)
        assert config is not None and (config.url, config.parallelism) == (extra.url, 1)
        assert _live(name)[0].capacity == 1 and _live(name)[0].host_mem > 0
    finally:
        worker.stop()
        extra.forget(name)


def test_worker_of_an_unknown_instance_says_how_to_add_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--instance", "nowhere-1"],
        env=dict(os.environ, CORRAL_DATABASE_URL=f"sqlite:///{tmp_path}/corral.db"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "corral fleet add nowhere-1 --url URL" in done.stderr
