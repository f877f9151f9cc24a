"""``corral bench --scenario embed``: batched embeddings against one call per job.

One fleet (2 simulated instances of parallelism 2) whose embedding model costs, as a GPU does,
``CALL_S`` per /api/embed call plus ``INPUT_S`` per input in it (an Ollama embedding runner
runs one call at a time). N one-input embed jobs go through Corral twice, on two stacks
that differ only in ``embed_batching``, with the same routers (two of the batch tier); and
the same N inputs go straight to the simulators over HTTP, one call each, as many at once as
the fleet's slots.
Reported: jobs/s of each, the ratio batched / unbatched, the calls the simulators saw, and
that each input's vector is the same batched and unbatched.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import typer

from app.bench.fleet import _stack
from app.bench.harness import free_port, queue_counts, wait_until
from app.queues import route_queue

MODEL = "bench-embed:latest"
#: The embedding model's cost: per call, and per input of the call.
CALL_S = 0.1
INPUT_S = 0.002
PARALLELISM = 2
#: Router threads per tier, in both Corral runs: a waiting job holds one, so they bound how
#: many jobs can ride in the calls under way.
ROUTER_THREADS = 64
#: Router processes of the batch tier, in both Corral runs.
BATCH_ROUTERS = 2


def embed_fleet() -> list[dict[str, Any]]:
    return [
        {
            "name": f"emb-{c}",
            "port": free_port(),
            "num_parallel": PARALLELISM,
            "preloaded": [MODEL],
            "models": [
                {
                    "name": MODEL,
                    "kind": "embed",
                    "load_seconds": 0.0,
                    "embed_call_seconds": CALL_S,
                    "embed_input_seconds": INPUT_S,
                }
            ],
        }
        for c in "ab"
    ]


def _texts(n: int) -> list[str]:
    return [f"document {i} of the embedding benchmark" for i in range(n)]


def _direct(urls: list[str], texts: list[str]) -> dict[str, Any]:
    """One call per input straight at the simulators, as many at once as there are slots."""
    lanes = len(urls) * PARALLELISM

    def lane(k: int) -> None:
        session = requests.Session()
        for i in range(k, len(texts), lanes):
            body = {"model": MODEL, "input": [texts[i]]}
            session.post(f"{urls[i % len(urls)]}/api/embed", json=body, timeout=60)

    t = time.perf_counter()
    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, range(lanes)))
    elapsed = time.perf_counter() - t
    return {
        "jobs": len(texts),
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(len(texts) / elapsed, 1),
    }


def _through_corral(batching: bool, texts: list[str]) -> tuple[dict[str, Any], list[Any]]:
    env = {
        "CORRAL_EMBED_BATCHING": str(batching).lower(),
        "CORRAL_ROUTER_CONCURRENCY": str(ROUTER_THREADS),
    }
    with _stack(embed_fleet(), "embed" + ("b" if batching else "u"), **env) as fleet:
        from tasks import infer

        # A second batch router: the batched run is bound by the routers' CPU per job (a
        # waiting job is held by a router thread), the unbatched one by the servers.
        fleet.start_router("batch", name="router-batch-2")
        queue = route_queue(MODEL, "batch")
        wait_until(lambda: queue_counts(queue)[1] == BATCH_ROUTERS, 60, "second batch router")

        for i in range(8):  # warm: connections, scripts
            infer.delay(model=MODEL, kind="embed", input=f"warm {i}").get(timeout=60)
        fleet.reset_sims()
        t = time.perf_counter()
        jobs = [infer.delay(model=MODEL, kind="embed", input=x, tier="batch") for x in texts]
        results = [j.get(timeout=600) for j in jobs]
        elapsed = time.perf_counter() - t
        assert len({r.id for r in results}) == len(texts)
        stats = {name: fleet.sim_stats(name) for name in fleet.sim_urls}
    calls = sum(s["models"][MODEL]["requests"] for s in stats.values())
    sizes = [r.routing.batch_size for r in results]
    run = {
        "batching": batching,
        "jobs": len(texts),
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(len(texts) / elapsed, 1),
        "embed_calls": calls,
        "jobs_per_call": round(len(texts) / max(calls, 1), 1),
        "largest_batch": max(sizes),
        "peak_in_flight": {name: s["peak_in_flight"] for name, s in stats.items()},
        "parallelism": PARALLELISM,
    }
    return run, [r.embeddings for r in results]


def run_embed(jobs: int = 1000) -> dict[str, Any]:
    texts = _texts(jobs)
    typer.echo(f"{jobs} one-input embed jobs through Corral, batched...")
    batched, vectors_b = _through_corral(True, texts)
    typer.echo(f"  {batched['jobs_per_s']} jobs/s, {batched['embed_calls']} calls")
    typer.echo(f"{jobs} one-input embed jobs through Corral, one call per job...")
    unbatched, vectors_u = _through_corral(False, texts)
    typer.echo(f"  {unbatched['jobs_per_s']} jobs/s, {unbatched['embed_calls']} calls")
    # The same fleet once more, for direct HTTP (the stacks above are stopped).
    with _stack(embed_fleet(), "embedd") as fleet:
        typer.echo(f"{jobs} calls straight at the simulators, one input each...")
        direct = _direct(list(fleet.sim_urls.values()), texts)
    report = {
        "call_s": CALL_S,
        "input_s": INPUT_S,
        "instances": 2,
        "parallelism": PARALLELISM,
        "router_threads": ROUTER_THREADS,
        "batch_routers": BATCH_ROUTERS,
        "corral_batched": batched,
        "corral_unbatched": unbatched,
        "direct_one_call_per_job": direct,
        "ratio_batched_to_unbatched": round(batched["jobs_per_s"] / unbatched["jobs_per_s"], 2),
        "ratio_batched_to_direct": round(batched["jobs_per_s"] / direct["jobs_per_s"], 2),
        "same_vectors": vectors_b == vectors_u,
    }
    _print(report)
    return report


def _print(r: dict[str, Any]) -> None:
    b, u, d = r["corral_batched"], r["corral_unbatched"], r["direct_one_call_per_job"]
    typer.echo(
        f"\nembeddings, {b['jobs']} one-input jobs, {r['instances']} instances x "
        f"{r['parallelism']}, {r['call_s']} s a call + {r['input_s']} s an input"
    )
    typer.echo(
        f"  Corral batched     {b['jobs_per_s']:7.1f} jobs/s  ({b['embed_calls']} calls, "
        f"{b['jobs_per_call']} jobs a call, largest {b['largest_batch']})"
    )
    typer.echo(f"  Corral unbatched   {u['jobs_per_s']:7.1f} jobs/s  ({u['embed_calls']} calls)")
    typer.echo(f"  direct HTTP        {d['jobs_per_s']:7.1f} jobs/s  (one call per job)")
    typer.echo(
        f"  batched / unbatched {r['ratio_batched_to_unbatched']} x; batched / direct "
        f"{r['ratio_batched_to_direct']} x; same vectors: {r['same_vectors']}; peak in flight "
        + ", ".join(f"{n} {p}/{b['parallelism']}" for n, p in b["peak_in_flight"].items())
    )
