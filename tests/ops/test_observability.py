"""Structured logs and OpenTelemetry traces across gateway, router and instance worker.

A fleet of its own (one simulated instance, its worker, the routers, a gateway), started
with ``CORRAL_LOG_FORMAT=json``, ``CORRAL_TRACING=true`` and spans written to files, so one
job can be followed through every process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from app.bench.harness import LocalFleet, free_port, own_fleet, wait_until
from tests.gateway.conftest import start_gateway

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("observed")
    sims = [
        {
            "name": "obs-a",
            "port": free_port(),
            "num_parallel": 2,
            "preloaded": [MODEL],
            "models": [{"name": MODEL, "kind": "chat", "load_seconds": 0.1}],
        }
    ]
    env = {
        "CORRAL_NAMESPACE": f"obs{os.getpid()}",
        "CORRAL_LOG_FORMAT": "json",
        "CORRAL_TRACING": "true",
        "CORRAL_TRACING_DIR": str(workdir / "spans"),
        "CORRAL_GATEWAY_AUTH": "false",
    }
    with own_fleet(workdir, sims, loglevel="INFO", **env) as fleet:
        gateway, url = start_gateway(workdir, "gateway-observed", **env)
        try:
            yield {"fleet": fleet, "url": url, "workdir": workdir}
        finally:
            gateway.stop()


def spans(workdir: Path) -> list[dict[str, Any]]:
    found = []
    for path in (workdir / "spans").glob("*.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def test_one_trace_follows_a_job_through_every_process(observed: dict[str, Any]) -> None:
    answer = requests.post(
        observed["url"] + "/api/generate",
        json={"model": MODEL, "prompt": "trace me", "stream": False},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    workdir: Path = observed["workdir"]

    def job_spans() -> dict[str, dict[str, Any]]:
        by_name = {s["name"]: s for s in spans(workdir)}
        wanted = ("corral.route", "corral.queue_wait", "ollama.generate", "POST /api/generate")
        return {n: by_name[n] for n in wanted if n in by_name}

    # Spans are exported in batches, about once a second.
    found = wait_until(lambda: len(job_spans()) == 4 and job_spans(), 15, "the job's spans")
    assert len({s["context"]["trace_id"] for s in found.values()}) == 1, found
    services = {s["resource"]["attributes"]["service.name"] for s in found.values()}
    assert services == {"corral-gateway", "corral-router-normal", "corral-worker-obs-a"}
    assert found["ollama.generate"]["attributes"]["instance"] == "obs-a"
    http_calls = [
        s
        for s in spans(workdir)
        if s["parent_id"] == found["ollama.generate"]["context"]["span_id"]
    ]
    assert http_calls, "the HTTP call to the instance is not a child of ollama.generate"
    heartbeats = [s for s in spans(workdir) if s["name"] == "GET" and s["parent_id"] is None]
    assert not heartbeats, "the instance worker's health checks make traces of their own"


def test_every_log_line_is_json_naming_its_job(observed: dict[str, Any]) -> None:
    answer = requests.post(
        observed["url"] + "/api/generate",
        json={"model": MODEL, "prompt": "log me", "stream": False},
        timeout=60,
    )
    job = answer.headers["X-Corral-Job-Id"]
    fleet: LocalFleet = observed["fleet"]

    def lines(name: str) -> list[dict[str, Any]]:
        text = fleet.procs[name].log.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    wait_until(
        lambda: any(r["job_id"] == job for r in lines("worker-obs-a")), 10, "the worker's lines"
    )
    for name in ("router-normal", "worker-obs-a"):
        about_job = [r for r in lines(name) if job in r["message"]]
        assert about_job, f"{name} logged nothing about the job"
        assert all(r["job_id"] == job for r in about_job), about_job
        assert {r["role"] for r in lines(name)} == {name}
