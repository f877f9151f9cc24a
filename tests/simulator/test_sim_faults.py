"""Fault knobs, their live control through /sim/faults, and /sim/refuse."""

from __future__ import annotations

import socket
import time

import httpx
import ollama
import pytest

from app.simulator import FleetThread, SimInstance, SimModel
from app.simulator.inference import RUNNER_CRASH

BUSY = "server busy, please try again.  maximum pending requests exceeded"


def quick(**knobs):
    """Settings for one fast preloaded chat model plus the given fault knobs."""
    return {
        "models": [SimModel(name="m", load_seconds=0, tokens_per_second=1000)],
        "preloaded": ["m"],
        **knobs,
    }


def test_error_rate_gives_runner_crash(start_sim):
    sim = start_sim(**quick(error_rate=1.0))
    with pytest.raises(ollama.ResponseError) as error:
        sim.client().generate(model="m", prompt="x")
    assert (error.value.status_code, error.value.error) == (500, RUNNER_CRASH)
    with pytest.raises(ollama.ResponseError) as stream_error:
        list(sim.client().chat(model="m", messages=[{"role": "user", "content": "x"}], stream=True))
    assert stream_error.value.status_code == 500  # nothing was sent yet: a real status
    stats = sim.stats()
    assert (stats["errors_total"], stats["in_flight"], stats["active"]) == (2, 0, 0)


def test_busy_rate_gives_503(start_sim):
    sim = start_sim(**quick(busy_rate=1.0))
    with pytest.raises(ollama.ResponseError) as error:
        sim.client().embed(model="m", input="x")
    assert (error.value.status_code, error.value.error) == (503, BUSY)


def test_mid_stream_error_arrives_inside_a_200_stream(start_sim):
    sim = start_sim(**quick(mid_stream_error_rate=1.0))
    received = []
    with pytest.raises(ollama.ResponseError) as error:
        for part in sim.client().generate(model="m", prompt="x", stream=True):
            received.append(part)
    assert (error.value.status_code, error.value.error) == (-1, RUNNER_CRASH)
    assert received and not received[-1].done
    with pytest.raises(ollama.ResponseError) as plain:
        sim.client().generate(model="m", prompt="x")
    assert plain.value.status_code == 500
    assert sim.stats()["errors_total"] == 2


def test_cut_stream_drops_the_connection(start_sim):
    sim = start_sim(**quick(cut_stream_rate=1.0))
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        for part in sim.client().generate(model="m", prompt="x", stream=True):
            received.append(part)
    assert received and not received[-1].done
    with pytest.raises(httpx.RemoteProtocolError):
        sim.client().embed(model="m", input="x")
    assert sim.stats()["errors_total"] == 2


def test_hang_until_client_leaves_then_slot_is_free(start_sim):
    sim = start_sim(**quick(hang=True, num_parallel=1))
    with pytest.raises(httpx.ReadTimeout):
        sim.client(timeout=0.3).generate(model="m", prompt="x")
    sim.wait_for(lambda: sim.stats()["in_flight"] == 0)
    assert sim.stats()["cancelled_total"] == 1

    knobs = sim.post("/sim/faults", json={"hang": False}).json()
    assert knobs["hang"] is False
    assert sim.client(timeout=5).generate(model="m", prompt="x").done


def test_turning_hang_off_releases_hung_requests(start_sim, concurrently):
    sim = start_sim(**quick(hang=True))

    def release_later():
        sim.wait_for(lambda: sim.stats()["active"] == 1)
        return sim.post("/sim/faults", json={"hang": False}).status_code

    reply, status = concurrently(
        [lambda: sim.client(timeout=5).generate(model="m", prompt="x"), release_later]
    )
    assert status == 200 and reply.done


def test_faults_endpoint_validates_and_applies(start_sim):
    sim = start_sim(**quick())
    assert sim.get("/sim/faults").json()["error_rate"] == 0
    updated = sim.post("/sim/faults", json={"error_rate": 0.5, "slow_factor": 2, "seed": 3})
    assert updated.status_code == 200
    assert updated.json() == {
        "error_rate": 0.5,
        "busy_rate": 0.0,
        "hang": False,
        "mid_stream_error_rate": 0.0,
        "cut_stream_rate": 0.0,
        "slow_factor": 2.0,
        "speed": 1.0,
        "seed": 3,
    }
    assert sim.stats()["faults"]["slow_factor"] == 2.0
    assert sim.post("/sim/faults", json={"error_rate": 2}).status_code == 400
    assert sim.post("/sim/faults", json={"colour": "red"}).status_code == 400
    assert sim.get("/sim/faults").json()["error_rate"] == 0.5


def test_refuse_closes_the_port_then_reopens(start_sim):
    sim = start_sim(**quick())
    host, port = sim.instance.host, sim.instance.port
    with httpx.Client(base_url=sim.url, timeout=5) as pooled:
        assert pooled.get("/").status_code == 200
        assert pooled.post("/sim/refuse", json={"seconds": 0.5}).json() == {"refusing_for": 0.5}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=2).close()
        with pytest.raises(httpx.ConnectError):
            pooled.get("/")  # the pooled keep-alive connection was closed too
        with pytest.raises(ConnectionError, match="Failed to connect to Ollama"):
            sim.client().list()

        deadline = time.monotonic() + 5
        while True:
            try:
                assert pooled.get("/").status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "simulator did not listen again"
                time.sleep(0.05)
    assert sim.client().generate(model="m", prompt="x").done


def test_one_fleet_serves_several_independent_instances():
    instances = [SimInstance(name=f"sim-{n}", port=0, **quick()) for n in "ab"]
    with FleetThread(instances) as fleet, httpx.Client(timeout=5) as http:
        assert instances[0].port != instances[1].port != 0
        http.post(f"{fleet.url(0)}/sim/faults", json={"error_rate": 1})
        assert http.post(f"{fleet.url(0)}/api/generate", json={"model": "m"}).status_code == 200
        ok = http.post(f"{fleet.url(1)}/api/generate", json={"model": "m", "prompt": "x"})
        failed = http.post(f"{fleet.url(0)}/api/generate", json={"model": "m", "prompt": "x"})
        assert (ok.status_code, failed.status_code) == (200, 500)
        stats = [http.get(f"{fleet.url(i)}/sim/stats").json() for i in (0, 1)]
        assert [s["instance"] for s in stats] == ["sim-a", "sim-b"]
        assert [s["errors_total"] for s in stats] == [1, 0]
