"""The rate-limit policy: its store on SQLite and PostgreSQL (seeded from the settings, the
latest change wins), then changes made live with the session's running workers, none of
which restarts: through `corral policy`, through a row edited in the database, and through
the gateway's admin API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from celery.result import AsyncResult

from app.bench.harness import LocalFleet, free_port, wait_until
from app.bench.stack import Child
from app.errors import RateLimited
from app.fleet.policy_admin import PolicyAdmin
from app.fleet.policy_store import PolicyStore, UnknownClass
from app.fleet.registry import Registry
from app.migrations import upgrade
from app.policy.live import READ_TTL, Policy, live_policy, policy_key, publish, published, refresh
from app.settings import AgentClass, Settings, get_settings
from app.state import keys
from app.state.fleet import redis_client
from tasks import infer

MODEL = "llama3.2:3b"
PID = os.getpid()
CORRAL = str(Path(sys.executable).parent / "corral")


# The store ---------------------------------------------------------------------------------


@pytest.fixture
def policy_db(db_url: str) -> str:
    """An empty database of each kind, migrated; ``db_url`` leaves the policy's tables of an
    earlier test in PostgreSQL, so they go too."""
    if db_url.startswith("postgresql"):
        engine = sa.create_engine(db_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS agent_classes, global_limits"))
        engine.dispose()
    upgrade(db_url)
    return db_url


HEAVY = {"agents": ["opus-*"], "rate_per_minute": 10, "max_in_flight": 4}
LIGHT = {"agents": ["sonnet-*"], "agent_rate_per_minute": 6, "on_limit": "refuse"}


def test_seeding_adds_new_classes_and_the_latest_change_wins(policy_db: str) -> None:
    store = PolicyStore(policy_db, "pol-seed")
    first = Settings(agent_classes={"heavy": HEAVY, "light": LIGHT}, global_rate_per_minute=120)
    assert store.seed_from_settings(first) == ["heavy", "light", "*"]
    assert store.load() == Policy.from_settings(first)
    assert store.seed_from_settings(first) == []  # a restart: nothing to write

    # Changes made live (corral policy, the admin API) survive a restart with the same file.
    store.update("heavy", rate_per_minute=5, on_limit="refuse")
    store.set_global_rate(None)
    assert store.put("extra", AgentClass(agents=["x-*"])) is True
    assert store.seed_from_settings(first) == []
    kept = store.load()
    assert kept.classes["heavy"].rate_per_minute == 5 and kept.classes["heavy"].on_limit == "refuse"
    assert kept.global_rate_per_minute is None

    # An entry edited in the file (or a new one) wins again; the others keep their changes.
    edited = Settings(
        agent_classes={"heavy": {**HEAVY, "max_in_flight": 2}, "light": LIGHT, "new": LIGHT},
        global_rate_per_minute=60,
    )
    assert store.seed_from_settings(edited) == ["heavy", "new", "*"]
    now = store.load()
    assert now.classes["heavy"] == edited.agent_classes["heavy"]
    assert now.global_rate_per_minute == 60
    # Creation order: the file's, then classes added later (the first match wins).
    assert list(now.classes) == ["heavy", "light", "extra", "new"]

    # Another namespace in the same database is another policy.
    assert PolicyStore(policy_db, "pol-other").load() == Policy()

    assert store.put("extra", AgentClass(agents=["y-*"])) is False  # replaced
    assert store.get("extra") == AgentClass(agents=["y-*"])
    assert store.remove("extra") and not store.remove("extra")
    with pytest.raises(UnknownClass, match="corral policy list"):
        store.update("extra", rate_per_minute=1)
    with pytest.raises(ValueError, match="not valid"):
        store.put("no spaces", AgentClass())
    with pytest.raises(ValueError, match="greater than 0"):
        store.update("light", rate_per_minute=0)
    with pytest.raises(ValueError, match="greater than 0"):
        store.set_global_rate(-1)


@pytest.fixture
def own_namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Settings of this test's own namespace, with classes in them; its keys deleted after."""
    ns = f"pol{PID}x{time.monotonic_ns()}"
    monkeypatch.setenv("CORRAL_NAMESPACE", ns)
    monkeypatch.setenv("CORRAL_AGENT_CLASSES", json.dumps({"heavy": HEAVY}))
    get_settings.cache_clear()
    try:
        yield ns
    finally:
        redis = redis_client(get_settings().redis_url)
        for key in redis.scan_iter(keys.everything(ns)):
            redis.delete(key)
        get_settings.cache_clear()


def test_a_process_starting_seeds_the_policy_and_a_refresh_repushes_it(
    policy_db: str, own_namespace: str
) -> None:
    # Nothing in Redis yet: the settings are the policy.
    assert not published() and live_policy(fresh=True).classes["heavy"].max_in_flight == 4
    Registry.ready(policy_db)  # what a worker, the gateway and the CLIs do at start
    assert published() and live_policy(fresh=True) == PolicyStore(policy_db).load()

    # A row edited behind the API's back is not in force until a refresh pushes it.
    PolicyStore(policy_db).update("heavy", max_in_flight=1)
    assert live_policy(fresh=True).classes["heavy"].max_in_flight == 4
    Registry.ready(policy_db)  # a restart seeds nothing new, and leaves Redis alone
    assert live_policy(fresh=True).classes["heavy"].max_in_flight == 4
    assert refresh(PolicyStore(policy_db)) is True  # this heartbeat's turn: the row pushed
    assert refresh(PolicyStore(policy_db)) is False  # the turn is taken for this heartbeat
    assert live_policy(fresh=True).classes["heavy"].max_in_flight == 1
    assert live_policy().class_limits("opus-3")[1] == AgentClass(**{**HEAVY, "max_in_flight": 1})

    # A value in Redis that does not validate is ignored: the settings apply meanwhile.
    redis_client(get_settings().redis_url).set(policy_key(own_namespace), '{"classes": 3}')
    assert live_policy(fresh=True).classes["heavy"].max_in_flight == 4


# Live changes with the session's workers ---------------------------------------------------


def corral(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, with the session's settings (its namespace and database)."""
    return subprocess.run(
        [CORRAL, *args], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )


def _forget(name: str) -> None:
    """The class gone from the session's policy and its buckets, whatever the test did."""
    store = PolicyStore()
    if store.remove(name):
        publish(store.load())
    redis = redis_client(get_settings().redis_url)
    for key in redis.scan_iter(keys.rate_all(get_settings().namespace)):
        if name in key:
            redis.delete(key)


def _pids(fleet: LocalFleet) -> dict[str, int]:
    assert all(child.alive() for child in fleet.procs.values())
    return {name: child.proc.pid for name, child in fleet.procs.items()}


@pytest.mark.fleet
def test_a_class_set_to_refuse_with_the_cli_refuses_at_once_then_lets_jobs_through(
    healthy_fleet: LocalFleet,
) -> None:
    name, agent = f"live{PID}", f"live{PID}-1"
    pids = _pids(healthy_fleet)
    submitted: list[AsyncResult] = []

    def refused() -> RateLimited | None:
        try:
            submitted.append(infer.delay(model=MODEL, prompt="live", agent=agent, cache=False))
        except RateLimited as exc:
            return exc
        time.sleep(0.1)
        return None

    def accepted() -> AsyncResult | None:
        try:
            return infer.delay(model=MODEL, prompt="again", agent=agent, cache=False)
        except RateLimited:
            time.sleep(0.1)
            return None

    try:
        assert infer.delay(model=MODEL, prompt="before", agent=agent).get(timeout=30).text
        out = corral(
            "policy",
            "set",
            name,
            "--agents",
            f"live{PID}-*",
            "--rate-per-minute",
            "0.5",
            "--on-limit",
            "refuse",
        )
        assert out.returncode == 0, out.stderr
        assert f"created {name}: agents live{PID}-*; 0.5/min for the class" in out.stdout
        # 0.5 a minute holds one token: the next call takes it, the one after is refused.
        exc = wait_until(refused, 5 * READ_TTL, "the class to refuse")
        assert exc.retry_after > 60 and f"class {name!r}" in str(exc)

        out = corral("policy", "set", name, "--rate-per-minute", "none", "--on-limit", "wait")
        assert out.returncode == 0, out.stderr
        first = wait_until(accepted, 5 * READ_TTL, "the class to take jobs again")
        more = [infer.delay(model=MODEL, prompt=f"after {i}", agent=agent) for i in range(5)]
        assert all(r.get(timeout=30).text for r in [first, *more, *submitted])

        listed = corral("policy", "list")
        assert listed.returncode == 0 and f"{name:16}" in listed.stdout, listed.stderr
        removed = corral("policy", "remove", name)
        assert removed.returncode == 0 and PolicyStore().get(name) is None, removed.stderr
    finally:
        _forget(name)
    assert _pids(healthy_fleet) == pids  # nothing restarted


def _runs(agent: str, jobs: int) -> list[tuple[float, float]]:
    """Start and end of each of ``jobs`` jobs of ``agent`` sent at once, in start order."""
    sent = [
        infer.delay(model=MODEL, prompt=f"bulkhead {i}", agent=agent, cache=False)
        for i in range(jobs)
    ]
    results = [r.get(timeout=60) for r in sent]
    return sorted(
        (r.routing.finished_at - r.routing.service_s, r.routing.finished_at) for r in results
    )


@pytest.mark.fleet
def test_a_bulkhead_set_live_is_honoured_by_the_running_routers(healthy_fleet: LocalFleet) -> None:
    name, agent = f"cap{PID}", f"cap{PID}-1"
    admin = PolicyAdmin(PolicyStore())
    for sim in healthy_fleet.sim_urls:
        healthy_fleet.faults(sim, slow_factor=20.0)  # ~0.4 s a job
    try:
        admin.set(name, agents=[f"cap{PID}-*"], max_in_flight=1)
        time.sleep(READ_TTL + 0.3)  # the routers' copy of the policy is at most this old
        capped = _runs(agent, 4)
        # One at a time, though 6 slots were free: each started after the previous one ended.
        assert all(start >= end - 0.01 for (_, end), (start, _) in pairwise(capped)), capped

        admin.update(name, max_in_flight=None)
        time.sleep(READ_TTL + 0.3)
        free = _runs(agent, 4)
        assert any(start < end - 0.05 for (_, end), (start, _) in pairwise(free)), free
    finally:
        healthy_fleet.clear_faults()
        _forget(name)


@pytest.mark.fleet
def test_a_row_edited_in_the_database_applies_after_the_periodic_repush(
    healthy_fleet: LocalFleet,
) -> None:
    name = f"sql{PID}"
    PolicyAdmin(PolicyStore()).put(name, AgentClass(agents=[f"sql{PID}-*"], max_in_flight=2))
    try:
        assert live_policy(fresh=True).classes[name].max_in_flight == 2
        engine = sa.create_engine(get_settings().database_url)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE agent_classes SET max_in_flight = 5, on_limit = 'refuse'"
                    " WHERE namespace = :ns AND name = :name"
                ),
                {"ns": get_settings().namespace, "name": name},
            )
        engine.dispose()

        def edited() -> bool:
            agent_class = live_policy(fresh=True).classes.get(name)
            return agent_class is not None and agent_class.max_in_flight == 5

        # The instance workers re-push every heartbeat (0.5 s in this session).
        wait_until(edited, 10 * get_settings().heartbeat_interval, "the edited row in force")
        assert live_policy().class_limits(f"sql{PID}-9")[1].on_limit == "refuse"
    finally:
        _forget(name)


# The admin API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_gateway(
    fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """A gateway on the session's own database (the one the workers re-push from), with an
    admin key and another key: (URL, admin key, other key)."""
    from app.gateway.api_keys import KeyStore

    store = KeyStore.ready(get_settings().database_url)
    admin_key, _ = store.add("ops", "admin", "normal", admin=True)
    user_key, _ = store.add("user", "agents", "normal")
    port = free_port()
    argv = [sys.executable, "-m", "app.cli", "gateway", "--port", str(port)]
    child = Child("policy-gateway", argv, dict(os.environ), log_dir=tmp_path_factory.mktemp("gw"))
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url) or not child.alive(), 30, "the gateway")
        assert child.alive(), child.log.read_text()
        yield url, admin_key, user_key
    finally:
        child.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).is_success
    except httpx.HTTPError:
        return False


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.fleet
def test_admin_api_changes_the_policy_live_for_admin_keys_only(
    policy_gateway: tuple[str, str, str],
) -> None:
    url, admin_key, user_key = policy_gateway
    for path in ("/admin/classes", "/admin/classes/x", "/admin/global-rate"):
        assert httpx.get(url + path, timeout=10).status_code == 401
        denied = httpx.get(url + path, headers=_auth(user_key), timeout=10)
        assert denied.status_code == 403 and "corral keys add --admin" in denied.json()["error"]

    http = httpx.Client(base_url=url, headers=_auth(admin_key), timeout=30)
    name = f"api{PID}"
    body: dict[str, Any] = {
        "agents": [f"api{PID}-*"],
        "rate_per_minute": 30.0,
        "agent_rate_per_minute": None,
        "on_limit": "wait",
        "max_in_flight": 2,
    }
    try:
        listed = http.get("/admin/classes")
        assert listed.status_code == 200 and listed.json()["global_rate_per_minute"] is None

        created = http.put(f"/admin/classes/{name}", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["config"]["max_in_flight"] == 2 and created.json()["applied"]
        assert live_policy(fresh=True).classes[name].rate_per_minute == 30
        assert http.put(f"/admin/classes/{name}", json=body).status_code == 200  # replaced

        patched = http.patch(
            f"/admin/classes/{name}", json={"on_limit": "refuse", "max_in_flight": None}
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["config"] == {**body, "on_limit": "refuse", "max_in_flight": None}
        live = live_policy(fresh=True).classes[name]
        assert live.on_limit == "refuse" and live.max_in_flight is None
        assert [c["name"] for c in http.get("/admin/classes").json()["classes"]].count(name) == 1

        for bad, says in (
            ({"max_inflight": 3}, "max_inflight"),
            ({"rate_per_minute": -1}, "rate_per_minute"),
            ({"on_limit": "maybe"}, "on_limit"),
            ({"agents": None}, "agents"),
        ):
            refused = http.patch(f"/admin/classes/{name}", json=bad)
            assert refused.status_code == 400 and says in refused.json()["error"], refused.text
        bad_name = http.put("/admin/classes/no%20spaces", json=body)
        assert bad_name.status_code == 400 and "not valid" in bad_name.json()["error"]

        assert http.get(f"/admin/classes/{name}").json()["name"] == name
        assert http.delete(f"/admin/classes/{name}").json() == {"removed": name}
        assert http.get(f"/admin/classes/{name}").status_code == 404
        assert http.delete(f"/admin/classes/{name}").status_code == 404
        assert http.patch(f"/admin/classes/{name}", json={"max_in_flight": 1}).status_code == 404
        assert name not in live_policy(fresh=True).classes

        assert http.get("/admin/global-rate").json() == {"global_rate_per_minute": None}
        raised = http.put("/admin/global-rate", json={"global_rate_per_minute": 100000})
        assert raised.json() == {"global_rate_per_minute": 100000.0}, raised.text
        assert live_policy(fresh=True).global_rate_per_minute == 100000
        assert http.put("/admin/global-rate", json={"global_rate_per_minute": 0}).status_code == 400
        assert http.put("/admin/global-rate", json={}).status_code == 400
        lifted = http.put("/admin/global-rate", json={"global_rate_per_minute": None})
        assert lifted.json() == {"global_rate_per_minute": None}
        assert live_policy(fresh=True).global_rate_per_minute is None
    finally:
        PolicyStore().set_global_rate(None)
        _forget(name)
        publish(PolicyStore().load())
