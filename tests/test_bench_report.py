"""The benchmark's plot and its in-flight sampler, on synthetic figures: no stack needed."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.bench_report import meta, publish, render
from app.bench_sampler import InFlightSampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _series(peak: int, seconds: float = 20.0) -> dict[str, Any]:
    t = [round(k * 0.1, 1) for k in range(int(seconds * 10))]
    counts = [max(0, round(peak * (1 - x / seconds))) for x in t]
    names = ["b-a", "b-b", "b-c"]
    return {
        "every_s": 0.1,
        "t": t,
        "instances": dict.fromkeys(names, counts),
        "parallelism": dict.fromkeys(names, 2),
    }


def synthetic_report() -> dict[str, Any]:
    rng = random.Random(7)
    batch = [rng.uniform(0, 20) for _ in range(200)]
    return {
        "meta": {"command": "corral bench", "started_at": "2025-01-01T00:00:00Z", "cpus": 2},
        "overhead": {
            "latency": {
                "direct": {"p50_ms": 3.4, "p95_ms": 6.4, "mean_ms": 4.0, "n": 200},
                "corral": {"p50_ms": 17.3, "p95_ms": 29.0, "mean_ms": 19.0, "n": 200},
                "overhead": {"p50_ms": 13.9, "p95_ms": 22.6, "mean_ms": 15.0},
            },
            "throughput": {"jobs": 500, "corral_jobs_per_s": 88.0, "direct_requests_per_s": 531.0},
        },
        "mixed": {
            "jobs": 500,
            "fleet": "2 fast, 2 slow, 1 cold",
            "ideal_s": 14.29,
            "runs": {
                "corral least_connections": {"makespan_s": 16.6, "vs_ideal": 1.16},
                "corral smart": {"makespan_s": 17.0, "vs_ideal": 1.19},
                "proxy round_robin": {"makespan_s": 40.2, "vs_ideal": 2.81},
                "proxy least_connections": {"makespan_s": 18.4, "vs_ideal": 1.29},
            },
        },
        "backlog": {
            "batch_jobs": 200,
            "interactive_jobs": 20,
            "arrival_s": 0.5,
            "service_s": 0.25,
            "parallelism": {"b-a": 2, "b-b": 2, "b-c": 2},
            "corral": {
                "wait_s": {
                    "interactive": [rng.uniform(0.02, 0.3) for _ in range(20)],
                    "batch": batch,
                },
                "peak_in_flight": {"b-a": 2, "b-b": 2, "b-c": 2},
                "in_flight": _series(2),
            },
            "proxy_least_connections": {
                "wait_s": {
                    "interactive": [rng.uniform(15, 20) for _ in range(20)],
                    "batch": [0.0, *batch[1:]],  # a zero wait must survive the log scale
                },
                "peak_in_flight": {"b-a": 70, "b-b": 70, "b-c": 69},
                "in_flight": _series(70),
            },
        },
    }


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_renders_a_png_from_a_report(tmp_path: Path) -> None:
    png = render(synthetic_report(), tmp_path / "out" / "bench.png")
    assert _is_png(png)
    assert png.stat().st_size > 50_000  # four figures' worth of drawing, not a blank canvas


@pytest.mark.parametrize("scenario", ["backlog", "mixed", "overhead"])
def test_renders_any_one_scenario(tmp_path: Path, scenario: str) -> None:
    report = {scenario: synthetic_report()[scenario]}
    assert _is_png(render(report, tmp_path / "one.png"))


def test_a_report_without_scenarios_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no backlog"):
        render({"meta": {}}, tmp_path / "none.png")


def test_publish_draws_a_saved_report_beside_it_and_copies_it(tmp_path: Path) -> None:
    saved = tmp_path / "results" / "run.json"
    saved.parent.mkdir()
    saved.write_text(
        json.dumps(synthetic_report() | {"meta": meta(["bench", "--scenario", "all"])})
    )
    png = publish(saved, tmp_path / "docs" / "bench.png")
    assert png == tmp_path / "results" / "run.png"
    assert _is_png(png)
    assert (tmp_path / "docs" / "bench.png").read_bytes() == png.read_bytes()


@pytest.fixture
def fake_sim() -> Iterator[str]:
    class Stats(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"in_flight": 3}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_sampler_records_in_flight_per_instance(fake_sim: str) -> None:
    with InFlightSampler({"a": fake_sim, "b": fake_sim}, {"a": 2, "b": 2}, every_s=0.01) as s:
        threading.Event().wait(0.2)
    series = s.series()
    assert series["t"]  # at least the first tick, taken at once
    assert series["instances"]["a"] == series["instances"]["b"] == [3] * len(series["t"])
    assert series["parallelism"] == {"a": 2, "b": 2}
