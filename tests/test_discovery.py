"""Models pulled onto, or deleted from, a running instance: routable there without a restart,
and no longer routed there once gone (the instance worker rediscovers /api/tags)."""

from __future__ import annotations

import time

import pytest
import requests

from app.bench.harness import LocalFleet, wait_until
from app.errors import ModelNotServed
from app.state.fleet import fleet_state
from tasks import infer
from tasks.infer import SERVED_MODELS_TTL

pytestmark = pytest.mark.fleet

NEW = "phi3:mini"


def _submit_or_none(model: str):
    try:
        return infer.delay(model=model, prompt="hi", options={"num_predict": 4}, cache=False)
    except ModelNotServed:
        return None


def test_a_model_pulled_at_runtime_becomes_routable_and_a_deleted_one_stops(
    healthy_fleet: LocalFleet,
) -> None:
    sim_b = healthy_fleet.sim_urls["sim-b"]
    with pytest.raises(ModelNotServed):
        infer.delay(model=NEW, prompt="hi")
    requests.post(sim_b + "/api/pull", json={"model": NEW, "stream": False}, timeout=10)
    try:
        job = wait_until(lambda: _submit_or_none(NEW), 30, f"{NEW} to be served", every=0.5)
        assert job.get(timeout=30).routing.instance == "sim-b"
        # Only sim-b has it: every job for it goes there.
        jobs = [infer.delay(model=NEW, prompt=f"q {i}", cache=False) for i in range(6)]
        assert {j.get(timeout=30).routing.instance for j in jobs} == {"sim-b"}
    finally:
        requests.delete(sim_b + "/api/delete", json={"model": NEW}, timeout=10)
    wait_until(lambda: NEW not in fleet_state().instances.served_models(), 30, f"{NEW} to be gone")
    time.sleep(SERVED_MODELS_TTL)  # this process's copy of the served models
    with pytest.raises(ModelNotServed):
        infer.delay(model=NEW, prompt="hi")
