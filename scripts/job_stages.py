"""Where one job's time goes: per-stage wall time from the traces of sequential jobs.

Starts a zero-latency simulated fleet of its own (the overhead scenario's) with tracing to
JSON-lines files, runs N sequential interactive jobs (after 30 to warm up), then lines up
each job's spans (the client's publish, the router stage and its slot reservation, the move
to the instance's queue, the instance worker's stage and its Ollama call) and prints the
median and mean of each stage. Tracing adds a little to every stage: read them side by side.

    .venv/bin/python scripts/job_stages.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TRACES = Path(tempfile.mkdtemp(prefix="corral-traces-"))
os.environ.update(
    CORRAL_NAMESPACE=f"stages{os.getpid()}",
    CORRAL_CONFIG="/nonexistent/corral.toml",
    CORRAL_DATABASE_URL=f"sqlite:///{tempfile.mkdtemp()}/corral.db",
    CORRAL_TRACING="true",
    CORRAL_TRACING_DIR=str(TRACES),
    CORRAL_CACHE_ENABLED="false",
)

Span = tuple[str, str, float, float]  # process role, span name, start, end


def run_jobs(n: int) -> dict[str, float]:
    """Job id -> when its ``.get()`` returned."""
    from opentelemetry import trace

    from app.bench.harness import free_port, own_fleet
    from app.bench.overhead import MODEL, SIMS
    from app.observe import tracing

    sims = [{**s, "port": free_port()} for s in SIMS]
    returned = {}
    with own_fleet(Path(tempfile.mkdtemp()), sims):
        tracing.setup("client")
        from tasks import infer

        for i in range(30):
            infer.delay(model=MODEL, prompt=f"warm {i}", tier="interactive").get(timeout=30)
        for i in range(n):
            job = infer.delay(model=MODEL, prompt=f"stage {i}", tier="interactive")
            job.get(timeout=30)
            returned[job.id] = time.time()
        time.sleep(3)  # the workers' span processors flush every second
    trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
    return returned


def read_traces() -> tuple[dict[str, list[Span]], dict[str, str]]:
    """Spans per trace, and each trace's job id (the task id the Celery spans carry)."""

    def ts(iso: str) -> float:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    traces: dict[str, list[Span]] = {}
    jobs: dict[str, str] = {}
    for path in TRACES.glob("*.jsonl"):
        role = path.name.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            s = json.loads(line)
            trace_id, attributes = s["context"]["trace_id"], s.get("attributes", {})
            traces.setdefault(trace_id, []).append(
                (role, s["name"], ts(s["start_time"]), ts(s["end_time"]))
            )
            if job := attributes.get("celery.task_id") or attributes.get("messaging.message.id"):
                jobs[trace_id] = job
    return traces, jobs


def stages_of(spans: list[Span], returned_at: float) -> dict[str, float] | None:
    def first(role: str, name: str) -> tuple[float, float] | None:
        found = sorted((b, e) for r, n, b, e in spans if r.startswith(role) and n.startswith(name))
        return found[0] if found else None

    pub = first("client", "apply_async/corral.infer")
    router = first("router", "run/corral.infer")
    route = first("router", "corral.route")
    move = first("router", "apply_async/corral.infer")
    worker = first("worker", "run/corral.infer")
    call = first("worker", "ollama.")
    if not (pub and router and route and move and worker and call):
        return None
    return {
        "client: validate, count, publish (+confirm)": pub[1] - pub[0],
        "router: task start -> reserving a slot": route[0] - router[0],
        "router: reserve a slot (corral.route)": route[1] - route[0],
        "router: -> publish to the instance queue": move[0] - route[1],
        "router: publish to the instance queue (+confirm)": move[1] - move[0],
        "broker -> instance worker's task start": worker[0] - move[1],
        "worker: task start -> Ollama call": call[0] - worker[0],
        "Ollama call (simulator, HTTP)": call[1] - call[0],
        "worker: call end -> result stored, slot freed": worker[1] - call[1],
        "total: publish -> .get() returns": returned_at - pub[0],
    }


def main() -> None:
    returned = run_jobs(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    traces, jobs = read_traces()
    rows: dict[str, list[float]] = {}
    for trace_id, spans in traces.items():
        job = jobs.get(trace_id)
        stages = stages_of(spans, returned[job]) if job in returned else None
        for name, seconds in (stages or {}).items():
            rows.setdefault(name, []).append(seconds * 1000)
    print(f"{len(next(iter(rows.values()), []))} jobs traced (wall time, ms)")
    for name, ms in rows.items():
        print(f"  {name:50} p50 {statistics.median(ms):6.2f}  mean {statistics.mean(ms):6.2f}")


if __name__ == "__main__":
    main()
