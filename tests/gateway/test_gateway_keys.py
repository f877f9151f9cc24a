"""API keys in SQLite and in PostgreSQL: migrations, the store, the CLI, a gateway on each."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from app.bench.harness import LocalFleet, wait_until
from app.gateway.api_keys import KeyStore, digest
from app.migrations import head, upgrade
from tests.gateway.conftest import Gateway, start_gateway


def test_migrations_create_the_schema_once(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # already at head: nothing to do
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head()
        assert "api_keys" in sa.inspect(conn).get_table_names()
    engine.dispose()


def test_store_keeps_only_the_hash(db_url: str) -> None:
    store = KeyStore.ready(db_url)
    key, info = store.add("planner-7", "planner", "normal,interactive")
    assert key.startswith("crl_") and len(key) > 40
    assert info.tiers == ("interactive", "normal") and info.default_tier == "normal"
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_hash, prefix FROM api_keys")).one()
    engine.dispose()
    assert stored.key_hash == digest(key) and key not in stored
    assert store.lookup(key) == info and store.lookup(key + "x") is None
    assert [k.agent for k in store.all()] == ["planner-7"]
    assert store.revoke(info.prefix) is not None
    assert store.lookup(key) is None and store.all() == []
    assert store.revoke(info.prefix) is None
    with pytest.raises(ValueError, match="default tier"):
        store.add("x", "y", "batch", default_tier="interactive")
    with pytest.raises(ValueError, match="subset"):
        store.add("x", "y", "gold")


def _corral(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=dict(os.environ, CORRAL_DATABASE_URL=db_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_cli_add_list_revoke(db_url: str) -> None:
    assert _corral(db_url, "db", "upgrade").returncode == 0
    added = _corral(
        db_url,
        "keys",
        "add",
        "--agent",
        "etl-1",
        "--agent-class",
        "batch-etl",
        "--tiers",
        "batch,normal",
        "--default-tier",
        "batch",
    )
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("crl_") and "cannot be shown again" in added.stderr
    listed = _corral(db_url, "keys", "list")
    assert "etl-1" in listed.stdout and key[:12] in listed.stdout and key not in listed.stdout
    assert KeyStore(db_url).lookup(key).default_tier == "batch"
    assert _corral(db_url, "keys", "revoke", key[:12]).returncode == 0
    assert "1 key(s)" in _corral(db_url, "keys", "list", "--revoked").stdout
    assert _corral(db_url, "keys", "revoke", key[:12]).returncode != 0


def test_gateway_with_keys_in_postgresql(
    pg_url: str, tmp_path: Path, healthy_fleet: LocalFleet
) -> None:
    store = KeyStore.ready(pg_url)
    key, info = store.add("pg-agent", "tester", "interactive")
    child, url = start_gateway(
        tmp_path, "gateway-pg", CORRAL_DATABASE_URL=pg_url, CORRAL_GATEWAY_KEY_CACHE_TTL="0.2"
    )
    try:
        body = {"model": "llama3.2:3b", "prompt": "hi", "stream": False}
        reply = httpx.post(
            url + "/api/generate", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"}
        )
        assert reply.status_code == 200, reply.text
        store.revoke(str(info.id))
        time.sleep(0.3)
        denied = httpx.post(
            url + "/api/generate", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"}
        )
        assert denied.status_code == 401
    finally:
        child.stop()


def test_revoked_key_is_refused_within_the_cache_ttl(
    gateway: Gateway, healthy_fleet: LocalFleet
) -> None:
    store = KeyStore(gateway.db_url)
    key, info = store.add("short-lived", "tester", "normal")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(gateway.url + "/api/tags", headers=headers, timeout=10).status_code == 200
    store.revoke(info.prefix)
    wait_until(
        lambda: (
            httpx.get(gateway.url + "/api/tags", headers=headers, timeout=10).status_code == 401
        ),
        5,
        "the revoked key to be refused",
    )


def test_auth_off_takes_tier_and_agent_from_headers(
    tmp_path: Path, healthy_fleet: LocalFleet
) -> None:
    child, url = start_gateway(
        tmp_path,
        "gateway-open",
        CORRAL_DATABASE_URL=f"sqlite:///{tmp_path}/open.db",
        CORRAL_GATEWAY_AUTH="false",
    )
    try:
        headers = {"X-Corral-Tier": "interactive", "X-Corral-Agent": "demo"}
        job = httpx.post(
            url + "/jobs",
            json={"model": "llama3.2:3b", "prompt": "hi"},
            headers=headers,
            timeout=30,
        ).json()
        view = wait_until(
            lambda: (
                (v := httpx.get(f"{url}/jobs/{job['id']}", timeout=10).json())["state"]
                == "succeeded"
                and v
            ),
            30,
            "the job",
        )
        assert (view["tier"], view["agent"]) == ("interactive", "demo")
    finally:
        child.stop()
