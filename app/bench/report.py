"""The benchmark report: the JSON ``corral bench`` writes, and one PNG drawn from it.

``render`` is a pure function of the report dict, so a saved JSON can be drawn again
(``corral bench --plot-only FILE.json``). Corral and the baseline proxy always sit side by
side in one figure, from one run: the machine is shared, so only such comparisons hold.
Matplotlib's object API (no pyplot) draws off-screen without touching global state.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from app.bench.stats import percentile

CORRAL, BASELINE = "#1f6fb4", "#e0701b"
TIERS = ("interactive", "batch")
MIN_WAIT_S = 1e-3  # the floor of the log scale: a wait below 1 ms is drawn at 1 ms


#: The scenarios the plot draws (``short`` is a table of ratios: the report and the README).
PLOTTED = ("backlog", "agents", "mixed", "burst", "placement", "embed", "overhead", "submit")


def plottable(report: dict[str, Any]) -> bool:
    return any(k in report for k in PLOTTED)


def render(report: dict[str, Any], path: Path) -> Path:
    """Draw ``report`` (the dict ``corral bench`` writes) to the PNG ``path``."""
    backlog, agents = report.get("backlog"), report.get("agents")
    bottom = [
        k for k in ("mixed", "burst", "placement", "embed", "overhead", "submit") if k in report
    ]
    if not plottable(report):
        raise ValueError("the report has no scenario to plot")
    ratios = ([2.0] if backlog else []) + ([1.2] if agents else []) + ([1.0] if bottom else [])
    fig = Figure(figsize=(15, 5.2 * sum(ratios)), layout="constrained")
    subfigs = list(fig.subfigures(len(ratios), 1, height_ratios=ratios, squeeze=False)[:, 0])
    if backlog:
        _backlog(subfigs.pop(0), backlog)
    if agents:
        _agents(subfigs.pop(0), agents)
    if bottom:
        sub = subfigs.pop(0)
        axes = sub.subplots(1, len(bottom), squeeze=False)[0]
        for ax, key in zip(axes, bottom, strict=True):
            draw = {
                "mixed": _mixed,
                "burst": _burst,
                "placement": _placement,
                "embed": _embed,
                "submit": _submit,
            }
            draw.get(key, _overhead)(ax, report[key])
    fig.suptitle(
        "corral bench: Corral vs a plain proxy, on the same simulated Ollama fleet",
        fontsize=16,
        fontweight="bold",
    )
    meta = report.get("meta", {})
    if meta:
        fig.supxlabel(
            f"made by `{meta.get('command', 'corral bench')}` at {meta.get('started_at', '?')} "
            f"on {meta.get('cpus', '?')} CPUs shared with other work: "
            "compare side by side, not as absolute figures",
            fontsize=9,
            color="dimgray",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def publish(json_path: Path, copy_to: Path | None) -> Path | None:
    """Draw a saved report beside itself (same stem, ``.png``), and copy the plot; None when
    nothing in it is drawn."""
    report = json.loads(json_path.read_text())
    if not plottable(report):
        return None
    png = render(report, json_path.with_suffix(".png"))
    if copy_to is not None:
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, copy_to)
    return png


def meta(argv: list[str]) -> dict[str, Any]:
    """What the plot's footer says: the command that made the figures, when, on what."""
    return {
        "command": shlex.join(["corral", *argv]),
        "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
    }


# -- backlog: waits per tier, and requests in flight per instance --------------------------


def _backlog(sub: SubFigure, backlog: dict[str, Any]) -> None:
    service = backlog["service_s"]
    parallelism = backlog["parallelism"]
    sub.suptitle(
        f"Backlog: {backlog['interactive_jobs']} interactive jobs arriving every "
        f"{backlog['arrival_s']} s behind "
        f"{backlog['batch_jobs']} batch jobs submitted at once; {len(parallelism)} instances of "
        f"parallelism {max(parallelism.values())}, {service} s per job",
        fontsize=13,
    )
    (wait_c, wait_p), (flight_c, flight_p) = sub.subplots(2, 2)
    wait_p.sharey(wait_c)
    flight_p.sharex(flight_c)
    runs = (
        (backlog["corral"], "Corral", CORRAL, wait_c, flight_c),
        (backlog["proxy_least_connections"], "Least-connections proxy", BASELINE, wait_p, flight_p),
    )
    for run, name, color, wait_ax, flight_ax in runs:
        _waits(wait_ax, run["wait_s"], service, color, f"{name}: wait per job, by tier")
        _in_flight(flight_ax, run, f"{name}: requests inside each server over time")
    wait_c.set_ylabel("wait before the server starts the job\n(seconds, log scale)")
    flight_c.set_ylabel("requests inside the server\n(queued + running)")


def _waits(ax: Axes, waits: dict[str, list[float]], service: float, color: str, title: str) -> None:
    data = [[max(w, MIN_WAIT_S) for w in waits[t]] for t in TIERS]
    box = ax.boxplot(data, whis=(5, 95), showfliers=False, widths=0.45, patch_artist=True, zorder=2)
    for patch in box["boxes"]:
        patch.set(facecolor=color, alpha=0.3)
    for median in box["medians"]:
        median.set(color="black", linewidth=2)
    rng = random.Random(0)  # the same jitter on every render of a report
    for pos, values in enumerate(data, start=1):
        xs = [pos + rng.uniform(-0.17, 0.17) for _ in values]
        ax.scatter(xs, values, s=6, color=color, alpha=0.45, linewidths=0, zorder=3)
        p50, p95 = percentile(values, 50), percentile(values, 95)
        ax.annotate(
            f"p50 {_secs(p50)}\np95 {_secs(p95)}",
            (pos + 0.27, p50),
            va="center",
            fontsize=10,
            fontweight="bold",
        )
    ax.axhline(service, color="gray", linestyle=":", label=f"one job's service time ({service} s)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _secs(v)))
    ax.set_xticks([1, 2], [f"{t}\n({len(waits[t])} jobs)" for t in TIERS], fontsize=10)
    ax.set_xlim(0.5, 2.9)
    ax.set_title(title, fontsize=12)
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(axis="y", which="major", alpha=0.3)


def _in_flight(ax: Axes, run: dict[str, Any], title: str) -> None:
    series = run["in_flight"]
    for name, counts in series["instances"].items():
        ax.step(series["t"], counts, where="post", linewidth=1.3, label=name)
    limits = set(series["parallelism"].values())
    for limit in limits:
        ax.axhline(
            limit,
            color="crimson",
            linestyle="--",
            linewidth=1.5,
            label=f"parallelism ({limit})",
        )
    # The simulator's own peak is exact; the 10 Hz samples can miss a short spike.
    peak = max(run["peak_in_flight"].values())
    ax.text(
        0.98,
        0.95,
        f"peak in flight: {peak} (parallelism {max(limits)})",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=11,
        fontweight="bold",
        bbox={"facecolor": "white", "edgecolor": "lightgray"},
    )
    ax.set_ylim(0, max([peak, *limits]) * 1.5 + 0.5)  # headroom for the legend and the peak
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("seconds since the batch backlog was submitted")
    ax.set_title(title, fontsize=12)
    ax.legend(loc="upper left", ncols=2, fontsize=9)
    ax.grid(alpha=0.3)


# -- agents: waits per tier, single-job agents, classes against their limits ---------------

RUNS = (
    ("corral", "Corral", CORRAL),
    ("proxy_least_connections", "least-connections proxy", BASELINE),
)
QUANTILES = ("p50", "p95", "p99")


def _agents(sub: SubFigure, agents: dict[str, Any]) -> None:
    jobs, parallelism = agents["jobs"], agents["parallelism"]
    sub.suptitle(
        f"{sum(agents['agents'].values())} agents ({agents['agents']['heavy']} heavy, "
        f"{agents['agents']['light']} light): {jobs['batch']} batch jobs submitted at once, then "
        f"{jobs['normal']} normal and {jobs['interactive']} interactive over "
        f"{agents['window_s']:g} s; {len(parallelism)} instances of parallelism "
        f"{max(parallelism.values())}, {agents['service_s']} s per job",
        fontsize=13,
    )
    tiers_ax, singles_ax, classes_ax = sub.subplots(1, 3, width_ratios=[2.2, 1.5, 1])
    _tier_waits(tiers_ax, agents)
    _single_agents(singles_ax, agents)
    _class_flight(classes_ax, agents)


def _tier_waits(ax: Axes, agents: dict[str, Any]) -> None:
    service = agents["service_s"]
    tiers = list(agents["corral"]["wait_s"])
    width = 0.4
    for k, (key, name, color) in enumerate(RUNS):
        waits = agents[key]["wait_s"]
        xs = [t * 4 + q + (k - 0.5) * width for t in range(len(tiers)) for q in range(3)]
        values = [max(waits[tier][f"{q}_s"], MIN_WAIT_S) for tier in tiers for q in QUANTILES]
        ax.bar(xs, values, width, color=color, alpha=0.85, label=name)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(_secs(v), (x, v), ha="center", va="bottom", fontsize=7, rotation=90)
    target = agents["targets"]["interactive_p95_x_service"] * service
    ax.hlines(
        target,
        -0.5,
        2.5,
        color="crimson",
        linestyle="--",
        label=f"target: interactive p95 <= {_secs(target)}",
    )
    ax.axhline(service, color="gray", linestyle=":", label=f"one job's service time ({service} s)")
    ax.set_xticks(
        [t * 4 + q for t in range(len(tiers)) for q in range(3)],
        [
            q + (f"\n{tier} ({agents['corral']['wait_s'][tier]['n']} jobs)" if q == "p95" else "")
            for tier in tiers
            for q in QUANTILES
        ],
    )
    ax.set_yscale("log")
    ax.set_ylim(MIN_WAIT_S, _top(ax) * 40)  # room above the tallest bar for its label
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _secs(v)))
    ax.set_ylabel("wait before the server starts the job\n(log scale)")
    ax.set_title("Wait per tier: p50, p95, p99", fontsize=12)
    ax.legend(loc="upper left", ncols=2, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _single_agents(ax: Axes, agents: dict[str, Any]) -> None:
    names = [s["agent"] for s in agents["corral"]["single_job_agents"]]
    width = 0.4
    for k, (key, name, color) in enumerate(RUNS):
        by_agent = {s["agent"]: s for s in agents[key]["single_job_agents"]}
        xs = [i + (k - 0.5) * width for i, a in enumerate(names) if a in by_agent]
        found = [by_agent[a] for a in names if a in by_agent]
        ratios = [max(s["x_fair_share"], 0.01) for s in found]
        ax.bar(
            xs,
            ratios,
            width,
            color=color,
            alpha=0.85,
            label=f"{name}: max wait {_secs(agents[key]['single_max_wait_s'])}",
        )
        for x, r, s in zip(xs, ratios, found, strict=True):
            ax.annotate(
                _secs(s["wait_s"]), (x, r), ha="center", va="bottom", fontsize=7, rotation=90
            )
    target = agents["targets"]["single_x_fair_share"]
    ax.axhline(target, color="crimson", linestyle="--", label=f"target: {target:g} x fair share")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(0.01, _top(ax) * 100)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} x"))
    ax.set_ylabel("wait / fair share (log scale)")
    ax.set_title(
        "Single-job agents: one normal job each, midway\n"
        "fair share = service x N / slots, N: agents with work outstanding\n"
        "in a round-robin reference schedule of the same jobs",
        fontsize=12,
    )
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _class_flight(ax: Axes, agents: dict[str, Any]) -> None:
    classes = list(agents["corral"]["classes"])
    limits = agents["limits"]["classes"]
    width = 0.4
    for k, (key, name, color) in enumerate(RUNS):
        figures = [agents[key]["classes"][c] for c in classes]
        xs = [i + (k - 0.5) * width for i in range(len(classes))]
        peaks = [f.get("peak_in_flight", 0) for f in figures]
        ax.bar(xs, peaks, width, color=color, alpha=0.85, label=name)
        for x, p, f in zip(xs, peaks, figures, strict=True):
            ax.annotate(
                f"{p}\n{f.get('jobs_per_minute', 0):.0f}/min",
                (x, p),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    for i, c in enumerate(classes):
        cap = limits[c].get("max_in_flight")
        if cap:
            ax.hlines(
                cap,
                i - 0.45,
                i + 0.45,
                color="crimson",
                linestyle="--",
                label=f"{c} bulkhead (max_in_flight {cap})",
            )
    slots = sum(agents["parallelism"].values())
    ax.axhline(slots, color="gray", linestyle=":", label=f"the fleet's slots ({slots})")
    ax.set_xticks(
        range(len(classes)),
        [f"{c} ({', '.join(limits[c]['agents'])})\n{_limits(limits[c])}" for c in classes],
        fontsize=9,
    )
    ax.set_yscale("log")
    ax.set_ylim(0.8, _top(ax) * 100)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("class (its agents), rate limits")
    ax.set_ylabel("requests inside the servers at once\n(peak, log scale)")
    ax.set_title("Agent classes: peak in flight,\nand jobs a minute", fontsize=12)
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _limits(limits: dict[str, Any]) -> str:
    said = [
        f"{limits['rate_per_minute']:g}/min" if limits.get("rate_per_minute") else "",
        f"{limits['agent_rate_per_minute']:g}/min/agent"
        if limits.get("agent_rate_per_minute")
        else "",
    ]
    return "\n".join(x for x in said if x) or "no rate limit"


def _top(ax: Axes) -> float:
    """The tallest bar drawn on ``ax`` so far."""
    return max((p.get_height() for p in ax.patches if isinstance(p, Rectangle)), default=1.0)


# -- mixed fleet and overhead ----------------------------------------------------------------


def _mixed(ax: Axes, mixed: dict[str, Any]) -> None:
    runs = list(mixed["runs"].items())[::-1]  # barh draws bottom-up; keep the run order
    labels = [n.replace("corral ", "Corral, ").replace("proxy ", "proxy, ") for n, _ in runs]
    ratios = [r["vs_ideal"] for _, r in runs]
    colors = [CORRAL if n.startswith("corral") else BASELINE for n, _ in runs]
    ax.barh(labels, ratios, color=colors, alpha=0.85)
    short = mixed.get("short", {})
    for y, (name, r) in enumerate(runs):
        text = f" {r['vs_ideal']:.2f} x  ({r['makespan_s']:.1f} s)"
        if name in short.get("runs", {}):
            s = short["runs"][name]
            loads = s["cold_loads"]
            text += f";  {short['jobs']} jobs: {s['makespan_s']:.1f} s, {loads} cold load"
            text += "" if loads == 1 else "s"
        ax.annotate(text, (r["vs_ideal"], y), va="center")
    ax.axvline(
        1.0,
        color="black",
        linestyle="--",
        label=f"ideal: total work / total capacity = {mixed['ideal_s']} s",
    )
    ax.set_xlim(0, max(ratios) * (2.0 if short else 1.3))
    ax.set_xlabel("makespan / ideal (lower is better)")
    ax.set_title(
        f"Mixed fleet, {mixed['jobs']} batch jobs per run, by routing strategy\n({mixed['fleet']})",
        fontsize=12,
    )
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _burst(ax: Axes, burst: dict[str, Any]) -> None:
    """Time to drain each burst, Corral beside the proxy; idle slot-time and the interactive
    wait written on each bar."""
    rows = [
        (f"{name}, {label}", r)
        for name, b in burst["bursts"].items()
        for label, r in (("Corral", b["corral"]), ("proxy", b["proxy_least_connections"]))
    ][::-1]
    ax.barh(
        [n for n, _ in rows],
        [r["drain_s"] for _, r in rows],
        color=[CORRAL if n.endswith("Corral") else BASELINE for n, _ in rows],
        alpha=0.85,
    )
    for y, (_, r) in enumerate(rows):
        ax.annotate(
            f" {r['drain_s']:.1f} s; idle {r['idle_share']:.0%} of slot-time while work waited;"
            f" interactive wait p95 {r['interactive_wait_p95_ms'] / 1000:.2f} s",
            (r["drain_s"], y),
            va="center",
            fontsize=9,
        )
    ax.axvline(burst["ideal_drain_s"], color="black", linestyle="--", label="ideal drain")
    ax.set_xlim(0, max(r["drain_s"] for _, r in rows) * 2.0)
    ax.set_xlabel("seconds to drain the burst (lower is better)")
    jobs = sum(next(iter(burst["bursts"].values()))["per_tier"].values())
    ax.set_title(
        f"A burst of {jobs} jobs at once ({burst['fleet']}, {burst['service_s']} s a job)",
        fontsize=12,
    )
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _placement(ax: Axes, placement: dict[str, Any]) -> None:
    """Makespan / ideal of each scenario and system, with the loads and the cold
    interactive jobs' wait written on each bar."""
    titles = {"two_models": "2 models, 1 held per box", "five_models": "5 models, 2 per box"}
    rows = [
        (f"{titles[key]}:\n{label.replace('corral ', 'Corral, ').replace('proxy ', 'proxy, ')}", r)
        for key in titles
        for label, r in placement[key]["runs"].items()
    ][::-1]
    ratios = [r["vs_ideal"] for _, r in rows]
    ax.barh(
        [n for n, _ in rows],
        ratios,
        color=[BASELINE if "proxy" in n else CORRAL for n, _ in rows],
        alpha=0.85,
    )
    for y, (_, r) in enumerate(rows):
        text = f" {r['vs_ideal']:.2f} x ({r['makespan_s']:.1f} s), {r['loads']} loads"
        if "cold_interactive" in r:
            text += f"; cold model's wait p95 {r['cold_interactive']['p95_s']:.1f} s"
        ax.annotate(text, (r["vs_ideal"], y), va="center", fontsize=9)
    ax.axvline(1.0, color="black", linestyle="--", label="ideal: work / slots + one load")
    ax.set_xlim(0, max(ratios) * 2.0)
    ax.set_xlabel("makespan / ideal (lower is better)")
    target = placement["five_models"].get("cold_interactive", {}).get("target_wait_s")
    ax.set_title(
        f"More models than the boxes hold ({placement['service_s']} s a job,"
        f" {placement['load_s']:g} s loads)"
        + (f"\ncold interactive target: wait <= {target:g} s" if target else ""),
        fontsize=12,
    )
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _embed(ax: Axes, embed: dict[str, Any]) -> None:
    """Jobs/s of one-input embed jobs: batched, one call per job, and direct HTTP."""
    rows = [
        ("direct HTTP,\none call per job", embed["direct_one_call_per_job"], BASELINE),
        ("Corral,\none call per job", embed["corral_unbatched"], CORRAL),
        ("Corral, batched", embed["corral_batched"], CORRAL),
    ]
    rates = [r["jobs_per_s"] for _, r, _ in rows]
    ax.barh([n for n, _, _ in rows], rates, color=[c for _, _, c in rows], alpha=0.85)
    for y, (_, r, _) in enumerate(rows):
        calls = f", {r['embed_calls']} calls" if "embed_calls" in r else ""
        ax.annotate(f" {r['jobs_per_s']:.1f} jobs/s{calls}", (r["jobs_per_s"], y), va="center")
    ax.set_xlim(0, max(rates) * 1.6)
    ax.set_xlabel("jobs per second (higher is better)")
    ax.set_title(
        f"Batched embeddings: {embed['ratio_batched_to_unbatched']} x one call per job\n"
        f"({embed['call_s']} s a call + {embed['input_s']} s an input)",
        fontsize=12,
    )
    ax.grid(axis="x", alpha=0.3)


def _overhead(ax: Axes, overhead: dict[str, Any]) -> None:
    lat = overhead["latency"]
    width = 0.38
    for k, (key, name, color) in enumerate(
        (("direct", "direct HTTP to Ollama", BASELINE), ("corral", "through Corral", CORRAL))
    ):
        values = [lat[key]["p50_ms"], lat[key]["p95_ms"]]
        xs = [q + (k - 0.5) * width for q in range(2)]
        ax.bar(xs, values, width, color=color, alpha=0.85, label=name)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.1f} ms", (x, v), ha="center", va="bottom", fontsize=10)
    ax.set_xticks([0, 1], ["p50", "p95"])
    ax.set_ylabel("round trip per job (ms)")
    t = overhead["throughput"]
    published = overhead.get("submission")  # absent from reports made before it was measured
    one_thread = ""
    if published:
        delay, many = (published[m]["median_jobs_per_s"] for m in ("delay", "submit_many"))
        one_thread = (
            f"\npublished from one thread: infer.delay {delay:.0f} jobs/s,"
            f" submit_many {many:.0f} jobs/s"
        )
    ax.set_title(
        "Added latency per job: sequential jobs, zero-latency backend\n"
        f"{t['jobs']} jobs at once: Corral {t['corral_jobs_per_s']} jobs/s, "
        f"direct HTTP {t['direct_requests_per_s']} req/s{one_thread}",
        fontsize=12,
    )
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _submit(ax: Axes, submission: dict[str, Any]) -> None:
    names = {"delay": "infer.delay, one by one", "submit_many": "infer.submit_many"}
    for k, method in enumerate(names):
        rates = submission[method]["jobs_per_s"]
        ax.bar(k, statistics.median(rates), 0.6, color=(BASELINE, CORRAL)[k], alpha=0.85)
        ax.plot([k] * len(rates), rates, "k.", alpha=0.6)
        ax.annotate(
            f"{statistics.median(rates):.0f} jobs/s",
            (k, max(rates)),
            ha="center",
            va="bottom",
            fontsize=10,
        )
    ax.set_xticks([0, 1], list(names.values()))
    ax.set_ylabel("jobs published per second, one thread")
    ax.set_title(
        f"Submitting {submission['jobs']} jobs from one client thread, fleet up\n"
        f"(bar: median of {submission['rounds']} rounds; dots: each round)",
        fontsize=12,
    )
    ax.grid(axis="y", alpha=0.3)


def _secs(s: float) -> str:
    return f"{s * 1000:.3g} ms" if s < 1 else f"{s:.3g} s" if s < 1000 else f"{s:.0f} s"
