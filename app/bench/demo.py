"""The demo ``corral up`` runs: many agents at mixed tiers against the fleet, then a summary."""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import typer

from app.bench.stats import percentile
from app.schemas import InferResult
from app.settings import get_settings

CHAT_MODELS = ("llama3.2:3b", "qwen2.5:7b")
EMBED_MODEL = "nomic-embed-text"


def _job(i: int, tier: str) -> dict[str, Any]:
    agent = f"{tier}-agent-{i % 8}"
    if i % 10 == 0:
        return {
            "kind": "embed",
            "model": EMBED_MODEL,
            "input": [f"document {i}"],
            "tier": tier,
            "agent": agent,
            "cache": False,
        }
    return {
        "kind": "generate",
        "model": CHAT_MODELS[i % 5 == 0],
        "tier": tier,
        "agent": agent,
        "prompt": f"Agent {agent} asks question {i}.",
        "options": {"num_predict": 12},
    }


def sim_stats(urls: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for url in urls:
        try:
            out[url] = requests.get(f"{url}/sim/stats", timeout=2).json()
        except requests.RequestException:
            out[url] = {}
    return out


def run_demo(n_jobs: int, *, sim_urls: list[str]) -> list[InferResult]:
    from tasks import infer

    for url in sim_urls:
        requests.post(f"{url}/sim/reset", timeout=2)
    rng = random.Random(7)
    tiers = ["batch"] * int(n_jobs * 0.6) + ["normal"] * int(n_jobs * 0.25)
    tiers += ["interactive"] * (n_jobs - len(tiers))
    batch_first = [t for t in tiers if t == "batch"] + rng.sample(
        [t for t in tiers if t != "batch"], k=len(tiers) - tiers.count("batch")
    )
    typer.echo(
        f"demo: {n_jobs} jobs from {len({_job(i, t)['agent'] for i, t in enumerate(tiers)})}"
        " agents; the batch backlog is queued first, interactive jobs arrive behind it"
    )
    started = time.time()

    def one(i_tier: tuple[int, str]) -> InferResult:
        i, tier = i_tier
        if tier != "batch":
            time.sleep(rng.random() * 3)  # interactive and normal agents arrive over time
        result: InferResult = infer.delay(**_job(i, tier)).get(timeout=300)
        return result

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, enumerate(batch_first)))
    elapsed = time.time() - started

    by_tier: dict[str, list[float]] = defaultdict(list)
    service: list[float] = []
    for tier, r in zip(batch_first, results, strict=True):
        by_tier[tier].append(r.routing.wait_s)
        service.append(r.routing.service_s)
    typer.echo(
        f"\n{len(results)} jobs done in {elapsed:.1f}s; "
        f"mean service time {statistics.mean(service):.3f}s"
    )
    typer.echo(f"{'tier':12} {'jobs':>5} {'wait p50':>9} {'wait p95':>9}")
    for tier in ("interactive", "normal", "batch"):
        waits = by_tier.get(tier, [])
        typer.echo(
            f"{tier:12} {len(waits):5d} {percentile(waits, 50):8.2f}s {percentile(waits, 95):8.2f}s"
        )
    served = Counter(r.routing.instance for r in results)
    stats = sim_stats(sim_urls)
    typer.echo(f"\n{'instance':12} {'jobs':>5}  peak in flight / parallelism")
    parallelism = {i.name: i.parallelism for i in get_settings().instances}
    for url, s in stats.items():
        name = s.get("instance", url)
        typer.echo(
            f"{name:12} {served.get(name, 0):5d}  "
            f"{s.get('peak_in_flight', '?')} / {parallelism.get(name, '?')}"
        )
    return results
