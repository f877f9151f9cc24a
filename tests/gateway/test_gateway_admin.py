"""The admin API: the fleet registry over HTTP, for admin keys only."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from app.bench.harness import LocalFleet
from app.fleet.registry import Registry
from app.gateway.api_keys import KeyStore
from app.state import keys
from app.state.fleet import fleet_state
from tests.gateway.conftest import Gateway


@pytest.fixture
def admin_key(gateway: Gateway) -> str:
    key, info = KeyStore(gateway.db_url).add("ops", "admin", "normal", admin=True)
    assert info.admin
    return key


@pytest.fixture
def instance_name(gateway: Gateway) -> Iterator[str]:
    """A name nothing else uses; forgotten everywhere after the test, whatever happened."""
    name = f"adm-{os.getpid()}"
    yield name
    Registry(gateway.db_url).remove(name)
    fleet_state().instances.unregister(name)


def test_admin_api_needs_an_admin_key(
    gateway: Gateway, admin_key: str, healthy_fleet: LocalFleet
) -> None:
    url = gateway.url + "/admin/instances"
    assert httpx.get(url, timeout=10).status_code == 401
    denied = httpx.get(url, headers=gateway.auth(), timeout=10)
    assert denied.status_code == 403 and "corral keys add --admin" in denied.json()["error"]
    listed = httpx.get(url, headers=gateway.auth(admin_key), timeout=10)
    assert listed.status_code == 200
    views = {v["name"]: v for v in listed.json()["instances"]}
    assert set(healthy_fleet.sim_urls) <= set(views)  # seeded from the settings at start
    sim_a = views["sim-a"]
    assert sim_a["state"] == "up" and sim_a["in_registry"] and sim_a["live"]["host_mem"] > 0


def test_admin_api_adds_changes_drains_and_removes(
    gateway: Gateway, admin_key: str, instance_name: str
) -> None:
    http = httpx.Client(base_url=gateway.url, headers=gateway.auth(admin_key), timeout=30)
    name, key = instance_name, keys.instance(fleet_state().ns, instance_name)
    body = {"name": name, "url": "http://127.0.0.1:9", "parallelism": 3, "tags": ["t"]}

    added = http.post("/admin/instances", json=body)
    assert added.status_code == 201, added.text
    assert added.json()["state"] == "DOWN"  # no worker: no heartbeat
    assert fleet_state().redis.hget(key, "capacity") == "3"
    assert http.post("/admin/instances", json=body).status_code == 409
    typo = http.post("/admin/instances", json={**body, "name": "x", "paralelism": 2})
    assert typo.status_code == 400 and "paralelism" in typo.json()["error"]

    changed = http.patch(f"/admin/instances/{name}", json={"parallelism": 1, "role": "chat"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["config"]["parallelism"] == 1
    assert fleet_state().redis.hget(key, "capacity") == "1"
    assert http.patch(f"/admin/instances/{name}", json={"parallelism": 0}).status_code == 400

    drained = http.post(f"/admin/instances/{name}/drain")
    assert drained.json()["state"] == "draining"
    assert fleet_state().redis.hget(key, "enabled") == "0"
    assert Registry(gateway.db_url).get(name).enabled is False

    assert http.delete(f"/admin/instances/{name}").json() == {"removed": name, "requeued": 0}
    assert http.get(f"/admin/instances/{name}").status_code == 404
    assert name not in fleet_state().instances.instance_names()
    assert http.delete("/admin/instances/sim-a").status_code == 409  # in the fleet file
