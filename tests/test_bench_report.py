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

from app.bench.agents import CLASSES, Done, Job, describe, fair_shares, summarize, workload
from app.bench.report import meta, publish, render
from app.bench.sampler import InFlightSampler

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


def _finished(plan: list[Job], wait: dict[str, float], lost: int = 0) -> list[Done]:
    """Every job of ``plan`` submitted on time, waiting ``wait[tier]``, 0.25 s of service."""
    done = []
    for k, job in enumerate(plan):
        started = job.at + wait[job.tier] * (1 + k % 5 / 10)
        done.append(Done(job, job.at, started, started + 0.25))
    kept = len(done) - lost
    return done[:kept] + [Done(d.job, d.submitted, None, None) for d in done[kept:]]


def synthetic_agents() -> dict[str, Any]:
    plan = workload(backlog=60)
    fair = fair_shares(plan, 6, 0.25)
    corral = _finished(plan, {"interactive": 0.05, "normal": 0.05, "batch": 8.0})
    proxy = _finished(plan, {"interactive": 9.0, "normal": 9.0, "batch": 6.0}, lost=1)
    return describe(plan, 0.25, {"b-a": 2, "b-b": 2, "b-c": 2}) | {
        "corral": summarize(corral, 0.25, fair) | {"peak_in_flight": {"b-a": 2, "b-b": 2}},
        "proxy_least_connections": summarize(proxy, 0.25, fair)
        | {"peak_in_flight": {"b-a": 60, "b-b": 59}},
    }


SUBMISSION = {
    "jobs": 1000,
    "rounds": 3,
    "delay": {
        "jobs_per_s": [180.0, 210.5, 195.2],
        "median_jobs_per_s": 195.2,
        "cpu_ms_per_job": [1.9, 1.7, 1.8],
    },
    "submit_many": {
        "jobs_per_s": [1210.0, 1450.3, 1302.8],
        "median_jobs_per_s": 1302.8,
        "cpu_ms_per_job": [0.55, 0.5, 0.52],
    },
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
            "submission": SUBMISSION,
        },
        "submit": SUBMISSION,
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
        "agents": synthetic_agents(),
        "burst": {
            "fleet": "3 instances of parallelism 2",
            "service_s": 0.1,
            "ideal_drain_s": 11.67,
            "bursts": {
                "normal": {
                    "per_tier": {"normal": 700},
                    "corral": {
                        "drain_s": 13.5,
                        "idle_share": 0.11,
                        "interactive_wait_p95_ms": 120.0,
                    },
                    "proxy_least_connections": {
                        "drain_s": 12.4,
                        "idle_share": 0.01,
                        "interactive_wait_p95_ms": 11800.0,
                    },
                }
            },
        },
    }


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_renders_a_png_from_a_report(tmp_path: Path) -> None:
    png = render(synthetic_report(), tmp_path / "out" / "bench.png")
    assert _is_png(png)
    assert png.stat().st_size > 50_000  # four figures' worth of drawing, not a blank canvas


@pytest.mark.parametrize("scenario", ["backlog", "mixed", "overhead", "agents", "burst", "submit"])
def test_renders_any_one_scenario(tmp_path: Path, scenario: str) -> None:
    report = {scenario: synthetic_report()[scenario]}
    assert _is_png(render(report, tmp_path / "one.png"))


def test_renders_the_embed_scenario(tmp_path: Path) -> None:
    run = {"jobs_per_s": 85.6, "embed_calls": 99, "jobs_per_call": 10.1, "largest_batch": 57}
    report = {
        "embed": {
            "call_s": 0.1,
            "input_s": 0.002,
            "corral_batched": run,
            "corral_unbatched": {"jobs_per_s": 18.6, "embed_calls": 1000},
            "direct_one_call_per_job": {"jobs_per_s": 19.1},
            "ratio_batched_to_unbatched": 4.6,
        }
    }
    assert _is_png(render(report, tmp_path / "embed.png"))


def test_agents_report_has_every_figure_the_plot_and_the_readme_use() -> None:
    agents = synthetic_agents()
    corral, proxy = agents["corral"], agents["proxy_least_connections"]
    assert set(corral["wait_s"]) == {"interactive", "normal", "batch"}
    assert corral["wait_s"]["interactive"]["n"] == agents["jobs"]["interactive"]
    assert corral["lost"] == 0 and proxy["lost"] == 1
    assert corral["met"] == {
        "interactive_p95": True,
        "single_job_agents": True,
        "no_lost_jobs": True,
    }
    assert proxy["met"]["interactive_p95"] is False
    assert proxy["met"]["no_lost_jobs"] is False
    assert len(corral["single_job_agents"]) == 9  # opus-33..36 and sonnet-91..95
    assert set(corral["classes"]) == set(CLASSES)


def _job(agent: str, tier: str = "normal", role: str = "burst") -> Job:
    return Job(0.0, agent, "heavy", tier, role)


def test_fair_share_counts_the_agents_with_work_outstanding_under_equal_sharing() -> None:
    plan = [
        *[Job(0.0, "opus-1", "heavy", "batch", "batch")] * 10,  # both slots until 1.25 s
        Job(0.1, "sonnet-1", "light", "interactive", "steady"),  # its turn: 0.25-0.5 s
        Job(1.0, "opus-9", "heavy", "normal", "single"),
        Job(2.0, "sonnet-2", "light", "normal", "single"),  # the fleet idle again by then
    ]
    fair = fair_shares(plan, slots=2, service_s=0.25)
    # At 1.0 s opus-1 still has work, sonnet-1 is done: opus-1 and opus-9 itself.
    assert fair["opus-9"] == {"active_agents": 2, "fair_share_s": 0.25}
    assert fair["sonnet-2"] == {"active_agents": 1, "fair_share_s": 0.125}
    waited = Done(plan[-2], 1.0, 1.5, 1.75)
    (single,) = summarize([waited], 0.25, fair)["single_job_agents"]
    assert single["x_fair_share"] == 2.0
    # The target counts every single-job agent: one without an answer misses it.
    assert not summarize([waited], 0.25, fair)["met"]["single_job_agents"]
    both = [waited, Done(plan[-1], 2.0, 2.3, 2.55)]
    assert summarize(both, 0.25, fair)["met"]["single_job_agents"]
    assert summarize(both, 0.25, fair)["single_max_x_fair_share"] == 2.4


def test_class_figures_count_requests_inside_the_servers_at_once() -> None:
    done = [Done(_job(f"opus-{k}"), 0.0, k * 0.25, k * 0.25 + 1.0) for k in range(8)]
    heavy = summarize(done, 0.25, {})["classes"]["heavy"]
    assert heavy["peak_in_flight"] == 4  # each spans four starts; an end frees before a start
    # Sent to a server at once, as a proxy does: all 8 inside the servers, 4 of them queued.
    proxied = [d._replace(sent=0.0) for d in done]
    assert summarize(proxied, 0.25, {})["classes"]["heavy"]["peak_in_flight"] == 8
    assert heavy["jobs"] == 8
    assert heavy["bulkhead_jobs_per_minute"] == 960  # 4 slots / 0.25 s
    assert heavy["peak_jobs_per_minute"] == 48.0  # 8 starts in one 10 s window


def test_a_report_without_scenarios_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no scenario"):
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


def test_idle_share_counts_slot_time_unused_while_work_waited() -> None:
    from app.bench.burst import idle_share

    # 2 slots from t=0; the last job starts at t=10. One slot busy throughout, the other
    # idle from 4 to 6: 2 s idle of 20 slot-seconds.
    spans = {"a": [(0.0, 10.0), (0.0, 4.0), (6.0, 10.0), (10.0, 11.0)]}
    assert idle_share(spans, {"a": 2}, since=0.0) == {"idle_share": 0.1, "waited_s": 10.0}
    # Spans before the burst do not count, nor time after the last start.
    spans["a"].append((-5.0, -1.0))
    assert idle_share(spans, {"a": 2}, since=0.0)["idle_share"] == 0.1
    assert idle_share({"a": []}, {"a": 2}, since=0.0)["idle_share"] == 0.0


def test_slot_gaps_pair_each_start_with_the_slot_that_freed_first() -> None:
    from app.bench.burst import slot_gaps

    # Two slots: jobs end at 1.0 and 1.5; the next starts take them 2 ms and 10 ms later.
    spans = [(0.0, 1.0), (0.0, 1.5), (1.002, 2.0), (1.51, 2.5), (2.003, 3.0)]
    got = slot_gaps({"a": spans}, {"a": 2}, since=0.0)
    assert got["slot_gaps"] == 3
    assert got["slot_gap_p50_ms"] == pytest.approx(3.0, abs=0.01)
    # Before the burst (nothing waited) no gap counts.
    assert slot_gaps({"a": spans}, {"a": 2}, since=1.2)["slot_gaps"] == 2
    assert slot_gaps({"a": []}, {"a": 2}, since=0.0)["slot_gaps"] == 0
