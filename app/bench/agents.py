"""``corral bench --scenario agents``: 131 agents of two classes on one fleet, Corral vs a proxy.

The fleet is the backlog scenario's (3 simulated instances of parallelism 2, ``service_s`` per
job). The agents, 36 heavy (``opus-*``) and 95 light (``sonnet-*``), follow one seeded plan,
sent once through Corral and once through a least-connections proxy (no tiers, no limits):

* opus-1..4 submit a batch backlog (1000 jobs by default) at once, at the start;
* opus-5..32 each send two bursts of 3 normal jobs at random times in the window;
* sonnet-1..90 each send an interactive job every 30 s, from a random phase;
* opus-33..36 and sonnet-91..95 are single-job agents: one normal job each, midway.

Fair share of a single-job agent: ``service_s * N / slots``. With the fleet's slots shared
equally among N agents, each gets one slot every ``N * service_s / slots`` seconds, so a job
that arrives waits about that long for its turn. N is the agents with work queued or running
when the job arrives (itself included) in a reference schedule of the same plan where every
free slot goes to the next agent in turn (round-robin between agents, ``service_s`` a job):
a property of the workload, the same for both runs, not of how fast either run drained.

Targets: interactive wait p95 <= 1.5 x ``service_s`` behind the backlog, and no single-job
agent waiting more than 3 x its fair share. "Wait" is the time from submission until the
server starts the job (for the proxy: the round trip less Ollama's own compute time).

The interactive agents are impatient, as real clients are: each gives up on an answer after
``CLIENT_TIMEOUT_S`` and sends the request again, ``CLIENT_ATTEMPTS`` times in all. Through
Corral it revokes the job it gives up on (``AsyncResult.revoke()``); through the proxy its
HTTP request is closed, and the server drops it, as Ollama does. A job given up for good
counts in the waits with the time until it was given up (a lower bound). ``wasted_server_s``
is generation nobody received: the time the servers' slots were busy (the simulators'
``busy_seconds``) less the compute time of the answers the agents got.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import statistics
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import typer

from app.bench.fleet import MIX, Proxy, _stack, backlog_fleet
from app.bench.stats import percentile

WINDOW_S = 40.0  # live traffic; the backlog drains after it
STEADY_PERIOD_S = 30.0
BURSTS, BURST_JOBS = 2, 3
SINGLE_AT_S = WINDOW_S / 2
# A bucket holds 10 s of tokens (app.policy.rate_limits): peak rates over as long.
RATE_WINDOW_S = 10.0

# The heavy class may hold 4 of the 6 slots, so light agents always find 2. Its rate is a
# guard above what 4 slots can serve at 0.25 s (960 a minute): the bulkhead binds, and a
# rate that bound first would queue reservations ahead of the heavy agents' normal jobs.
# Light agents send 2 a minute each; their per-agent limit stops a runaway one.
CLASSES: dict[str, dict[str, Any]] = {
    "heavy": {"agents": ["opus-*"], "rate_per_minute": 1200, "max_in_flight": 4},
    "light": {"agents": ["sonnet-*"], "rate_per_minute": 600, "agent_rate_per_minute": 6},
}
GLOBAL_RATE_PER_MINUTE = 1800  # above the fleet's 1440 a minute at 0.25 s
TIERS = ("interactive", "normal", "batch")
TARGET_INTERACTIVE_P95_X_SERVICE = 1.5
TARGET_SINGLE_X_FAIR = 3.0
# The interactive agents give up on an answer after this many seconds, and try again.
CLIENT_TIMEOUT_S = 5.0
CLIENT_ATTEMPTS = 3


class Job(NamedTuple):
    at: float  # seconds after the run's start
    agent: str
    agent_class: str
    tier: str
    role: str  # batch, burst, steady or single


class Done(NamedTuple):
    job: Job
    submitted: float  # seconds after the run's start
    started: float | None  # None: no result (lost) or refused at the call
    finished: float | None
    refused: bool = False
    # When the request reached a server, if it then queued there (a proxy); through Corral
    # a request reaches its server only when a slot is free, so when it starts.
    sent: float | None = None
    attempts: int = 1
    # An impatient agent that gave up for good: when (seconds after the run's start).
    gave_up_at: float | None = None
    # The server's compute time for the answer the agent received (0: none received).
    received_s: float = 0.0

    @property
    def start(self) -> float:
        """When a job that ran started."""
        assert self.started is not None
        return self.started

    @property
    def end(self) -> float:
        """When a job that ran finished."""
        assert self.finished is not None
        return self.finished

    @property
    def wait(self) -> float:
        """Until the job started; for one given up, until then (a lower bound)."""
        if self.gave_up_at is not None:
            return self.gave_up_at - self.submitted
        assert self.started is not None
        return self.started - self.submitted

    @property
    def in_server(self) -> tuple[float, float]:
        """From reaching a server to finishing: queued or running inside it."""
        assert self.started is not None and self.finished is not None
        return (self.started if self.sent is None else self.sent), self.finished


def workload(backlog: int, seed: int = 1) -> list[Job]:
    """The plan both runs follow, in submission order."""
    rng = random.Random(seed)
    jobs = [Job(0.0, f"opus-{1 + i % 4}", "heavy", "batch", "batch") for i in range(backlog)]
    for a in range(5, 33):
        for _ in range(BURSTS):
            at = round(rng.uniform(1.0, WINDOW_S - 2), 3)
            jobs += [Job(at, f"opus-{a}", "heavy", "normal", "burst")] * BURST_JOBS
    for a in range(1, 91):
        at = rng.uniform(0.0, STEADY_PERIOD_S)
        while at < WINDOW_S:
            jobs.append(Job(round(at, 3), f"sonnet-{a}", "light", "interactive", "steady"))
            at += STEADY_PERIOD_S
    light, heavy = [f"sonnet-{a}" for a in range(91, 96)], [f"opus-{a}" for a in range(33, 37)]
    # The classes alternate, so each one's jobs meet the other's in the queue.
    singles = [a for pair in itertools.zip_longest(light, heavy) for a in pair if a]
    for k, agent in enumerate(singles):
        at = SINGLE_AT_S - 2 + 0.5 * k
        jobs.append(
            Job(at, agent, "heavy" if agent.startswith("opus") else "light", "normal", "single")
        )
    return sorted(jobs, key=lambda j: j.at)  # stable: the backlog first


def describe(plan: list[Job], service_s: float, parallelism: dict[str, int]) -> dict[str, Any]:
    """The report's account of the workload, the limits and the targets."""
    return {
        "agents": {c: len({j.agent for j in plan if j.agent_class == c}) for c in CLASSES},
        "service_s": service_s,
        "parallelism": parallelism,
        "window_s": WINDOW_S,
        "jobs": {t: sum(j.tier == t for j in plan) for t in TIERS},
        "limits": {"classes": CLASSES, "global_rate_per_minute": GLOBAL_RATE_PER_MINUTE},
        "targets": {
            "interactive_p95_x_service": TARGET_INTERACTIVE_P95_X_SERVICE,
            "single_x_fair_share": TARGET_SINGLE_X_FAIR,
        },
    }


def run_agents(batch: int = 1000, service_s: float = 0.25, seed: int = 1) -> dict[str, Any]:
    """``batch``: the backlog; Corral starts about 400 of it during the window, so 1000 keeps
    at least 500 queued behind every interactive job."""
    sims = backlog_fleet(service_s)
    parallelism = {s["name"]: s["num_parallel"] for s in sims}
    plan = workload(batch, seed)
    out = describe(plan, service_s, parallelism)
    env = {
        "CORRAL_AGENT_CLASSES": json.dumps(CLASSES),
        "CORRAL_GLOBAL_RATE_PER_MINUTE": str(GLOBAL_RATE_PER_MINUTE),
    }
    fair = fair_shares(plan, sum(parallelism.values()), service_s)
    with _stack(sims, "agents", **env) as fleet:
        typer.echo(f"  Corral: {len(plan)} jobs from {len({j.agent for j in plan})} agents...")
        fleet.reset_sims()
        done = _drive_corral(plan)
        out["corral"] = summarize(done, service_s, fair) | _server_figures(fleet, done)

        fleet.reset_sims()
        typer.echo("  least-connections proxy: the same jobs...")
        done = _drive_proxy(Proxy(list(fleet.sim_urls.values()), "least_connections"), plan)
        out["proxy_least_connections"] = summarize(done, service_s, fair) | _server_figures(
            fleet, done
        )
    _print(out)
    return out


def _server_figures(fleet: Any, done: list[Done]) -> dict[str, Any]:
    """What the servers saw: peak requests inside each, and time spent for nobody."""
    from app.bench.harness import wait_until

    # Requests closed by their clients end within moments; count only once they have.
    wait_until(lambda: all(fleet.sim_stats(n)["active"] == 0 for n in fleet.sim_urls), 30, "idle")
    stats = [fleet.sim_stats(n) for n in fleet.sim_urls]
    busy = sum(s["busy_seconds"] for s in stats)
    return {
        "peak_in_flight": {s["instance"]: s["peak_in_flight"] for s in stats},
        "server_busy_s": round(busy, 2),
        "wasted_server_s": round(max(0.0, busy - sum(d.received_s for d in done)), 2),
        "server_cancelled": sum(s["cancelled_total"] for s in stats),
    }


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _impatient(job: Job) -> bool:
    return job.role == "steady"


def _corral_done(job: Job, result: Any, t0: float, attempts: int = 1) -> Done:
    # Corral's own timestamps (the worker's, on this machine's clock): exact, where ours
    # are taken a little before each call.
    routing = result.routing
    finished = routing.finished_at - t0
    started = finished - routing.service_s
    received = result.timings.prompt_eval_s + result.timings.eval_s
    return Done(
        job, started - routing.wait_s, started, finished, attempts=attempts, received_s=received
    )


def _drive_corral(plan: list[Job]) -> list[Done]:
    from celery.exceptions import TimeoutError as ResultTimeout

    from app.errors import CorralError
    from tasks import infer

    t0 = time.time()

    def submit(job: Job, prompt: str) -> Any:
        try:
            return infer.delay(model=MIX, prompt=prompt, tier=job.tier, agent=job.agent)
        except CorralError:  # refused at the call (a rate limit or the degradation level)
            return None

    def impatient(job: Job, k: int, submitted: float) -> Done:
        for attempt in range(1, CLIENT_ATTEMPTS + 1):
            r = submit(job, f"a{k}.{attempt}")
            if r is None:
                return Done(job, submitted, None, None, refused=True, attempts=attempt)
            try:
                answered = _corral_done(job, r.get(timeout=CLIENT_TIMEOUT_S), t0, attempt)
                # Its wait counts from the first try, as the agent saw it.
                return answered._replace(submitted=min(submitted, answered.submitted))
            except ResultTimeout:
                r.revoke()  # nobody will read it: the fleet stops working on it
            except Exception:
                return Done(job, submitted, None, None, attempts=attempt)
        return Done(
            job, submitted, None, None, attempts=CLIENT_ATTEMPTS, gave_up_at=time.time() - t0
        )

    sent: list[tuple[Job, float, Any]] = []
    with ThreadPoolExecutor(256) as pool:
        for k, job in enumerate(plan):
            _sleep_until(t0 + job.at)
            submitted = time.time() - t0
            if _impatient(job):
                sent.append((job, submitted, pool.submit(impatient, job, k, submitted)))
            else:
                sent.append((job, submitted, submit(job, f"a{k}")))
        deadline = time.time() + 600
        done = []
        for job, submitted, r in sent:
            if r is None:
                done.append(Done(job, submitted, None, None, refused=True))
                continue
            try:
                if _impatient(job):
                    done.append(r.result(timeout=max(1.0, deadline - time.time())))
                    continue
                result = r.get(timeout=max(1.0, deadline - time.time()))
            except Exception:  # any failure or timeout: a job without a result
                done.append(Done(job, submitted, None, None))
                continue
            done.append(_corral_done(job, result, t0))
    return done


def _drive_proxy(proxy: Proxy, plan: list[Job]) -> list[Done]:
    """Each job is one request, sent at its planned time, waiting inside Ollama; an
    impatient agent's request is closed after ``CLIENT_TIMEOUT_S`` and sent again."""
    import requests

    t0 = time.time()

    def impatient(job: Job, k: int, submitted: float) -> Done:
        for attempt in range(1, CLIENT_ATTEMPTS + 1):
            try:
                call = proxy.call(f"p{k}.{attempt}", timeout=CLIENT_TIMEOUT_S)
            except requests.Timeout:
                continue
            sent = time.time() - t0 - call.total_s
            return Done(
                job,
                submitted,
                sent + call.wait_s,
                sent + call.total_s,
                sent=sent,
                attempts=attempt,
                received_s=call.service_s,
            )
        return Done(
            job, submitted, None, None, attempts=CLIENT_ATTEMPTS, gave_up_at=time.time() - t0
        )

    with ThreadPoolExecutor(len(plan)) as pool:
        sent = []
        for k, job in enumerate(plan):
            _sleep_until(t0 + job.at)
            submitted = time.time() - t0
            work = (impatient, job, k, submitted) if _impatient(job) else (proxy.call, f"p{k}")
            sent.append((job, submitted, pool.submit(*work)))
        done = []
        for job, submitted, future in sent:
            try:
                outcome = future.result(timeout=600)
            except Exception:
                done.append(Done(job, submitted, None, None))
                continue
            if isinstance(outcome, Done):
                done.append(outcome)
                continue
            started, finished = submitted + outcome.wait_s, submitted + outcome.total_s
            done.append(
                Done(
                    job, submitted, started, finished, sent=submitted, received_s=outcome.service_s
                )
            )
    return done


# -- figures: pure functions of the finished jobs --------------------------------------------


def summarize(
    done: list[Done], service_s: float, fair: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """A run's figures; ``fair``: the single-job agents' fair shares (``fair_shares``)."""
    ok = [d for d in done if d.started is not None]
    gave_up = [d for d in done if d.gave_up_at is not None]
    waits = {t: _quantiles([d.wait for d in ok + gave_up if d.job.tier == t]) for t in TIERS}
    singles = single_job_agents(done, fair)
    interactive_p95 = waits["interactive"]["p95_s"]
    lost = sum(d.started is None and not d.refused and d.gave_up_at is None for d in done)
    return {
        "wait_s": waits,
        "classes": {c: _class_figures(done, c, service_s) for c in CLASSES},
        "single_job_agents": singles,
        "single_max_wait_s": max((s["wait_s"] for s in singles), default=0.0),
        "single_max_x_fair_share": max((s["x_fair_share"] for s in singles), default=0.0),
        "batch_queued_at_interactive": _batch_queued(done),
        "makespan_s": round(max((d.end for d in ok), default=0.0), 2),
        "refused": sum(d.refused for d in done),
        "lost": lost,
        # Impatient agents: answers they gave up waiting for (and asked again), and jobs
        # they gave up on for good after CLIENT_ATTEMPTS tries.
        "client_timeouts": sum(d.attempts - 1 for d in done) + len(gave_up),
        "gave_up": len(gave_up),
        "met": {
            "interactive_p95": interactive_p95 <= TARGET_INTERACTIVE_P95_X_SERVICE * service_s,
            # Every single-job agent got its answer, none later than the target allows.
            "single_job_agents": len(singles) == len(fair)
            and all(s["x_fair_share"] <= TARGET_SINGLE_X_FAIR for s in singles),
            "no_lost_jobs": lost == 0,
        },
        "interactive_p95_x_service": round(interactive_p95 / service_s, 2),
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_s": 0.0, "p95_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    return {
        "n": len(values),
        **{f"p{q}_s": round(percentile(values, q), 4) for q in (50, 95, 99)},
        "max_s": round(max(values), 4),
    }


def fair_shares(plan: list[Job], slots: int, service_s: float) -> dict[str, dict[str, float]]:
    """Each single-job agent's fair share: ``service_s * N / slots`` (module docstring)."""
    out = {}
    for job, active in zip(plan, _equal_share_active(plan, slots, service_s), strict=True):
        if job.role == "single":
            fair = service_s * active / slots
            out[job.agent] = {"active_agents": active, "fair_share_s": round(fair, 4)}
    return out


def _equal_share_active(plan: list[Job], slots: int, service_s: float) -> list[int]:
    """Agents with work queued or running at each job's arrival (itself included), in the
    reference schedule: every free slot goes to the next agent in turn, ``service_s`` a job."""
    queued: Counter[str] = Counter()
    outstanding: Counter[str] = Counter()
    turns: deque[str] = deque()  # agents with jobs queued, in round-robin order
    running: list[tuple[float, int, str]] = []  # (end, tiebreak, agent)
    ends = itertools.count()

    def start(now: float) -> None:
        while len(running) < slots and turns:
            agent = turns.popleft()
            queued[agent] -= 1
            if queued[agent]:
                turns.append(agent)
            heapq.heappush(running, (now + service_s, next(ends), agent))

    active = []
    for job in plan:
        while running and running[0][0] <= job.at:
            end, _, agent = heapq.heappop(running)
            outstanding[agent] -= 1
            start(end)
        active.append(1 + sum(n > 0 for a, n in outstanding.items() if a != job.agent))
        outstanding[job.agent] += 1
        queued[job.agent] += 1
        if queued[job.agent] == 1:
            turns.append(job.agent)
        start(job.at)
    return active


def single_job_agents(done: list[Done], fair: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each single-job agent's wait against its fair share."""
    return [
        {
            "agent": d.job.agent,
            "class": d.job.agent_class,
            "wait_s": round(d.wait, 4),
            **fair[d.job.agent],
            "x_fair_share": round(d.wait / fair[d.job.agent]["fair_share_s"], 2),
        }
        for d in done
        if d.job.role == "single" and d.started is not None
    ]


def _class_figures(done: list[Done], agent_class: str, service_s: float) -> dict[str, Any]:
    """Throughput, and requests inside the servers at once, next to the class's limits."""
    mine = [d for d in done if d.job.agent_class == agent_class and d.started is not None]
    limits = CLASSES[agent_class]
    if not mine:
        return {"jobs": 0, "limits": limits}
    span = max(d.end for d in mine) - min(d.submitted for d in mine)
    starts = [d.start for d in mine]
    per_agent: dict[str, list[float]] = {}
    for d in mine:
        per_agent.setdefault(d.job.agent, []).append(d.start)
    cap = limits.get("max_in_flight")
    return {
        "jobs": len(mine),
        "jobs_per_minute": round(len(mine) / span * 60, 1),
        "peak_jobs_per_minute": _peak_rate(starts),
        "peak_agent_jobs_per_minute": max(_peak_rate(s) for s in per_agent.values()),
        # Through Corral, the slots held (what max_in_flight caps); through a proxy, also
        # the requests queued inside Ollama, as the simulators' own peak_in_flight counts.
        "peak_in_flight": _peak_overlap([d.in_server for d in mine]),
        # What the bulkhead lets through at most: its slots, each busy all the time.
        "bulkhead_jobs_per_minute": round(cap / service_s * 60) if cap else None,
        "limits": limits,
    }


def _peak_rate(starts: list[float]) -> float:
    """The most jobs started in any ``RATE_WINDOW_S``, as jobs a minute."""
    starts, best, lo = sorted(starts), 0, 0
    for hi, t in enumerate(starts):
        while t - starts[lo] >= RATE_WINDOW_S:
            lo += 1
        best = max(best, hi - lo + 1)
    return round(best * 60 / RATE_WINDOW_S, 1)


def _peak_overlap(intervals: list[tuple[float, float]]) -> int:
    # An end sorts before a start at the same instant: a slot handed over is not held twice.
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    held = peak = 0
    for _, step in edges:
        held += step
        peak = max(peak, held)
    return peak


def _batch_queued(done: list[Done]) -> dict[str, float]:
    """Batch jobs submitted but not started when each interactive job was submitted."""
    batch = [
        (d.submitted, d.started if d.started is not None else float("inf"))
        for d in done
        if d.job.tier == "batch"
    ]
    counts = [
        sum(s <= d.submitted < start for s, start in batch)
        for d in done
        if d.job.tier == "interactive"
    ]
    if not counts:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(counts), "median": statistics.median(counts), "max": max(counts)}


def _print(r: dict[str, Any]) -> None:
    service = r["service_s"]
    typer.echo(
        f"\n  wait before the server starts the job (s), {service} s per job; "
        f"targets: interactive p95 <= {TARGET_INTERACTIVE_P95_X_SERVICE} x service, "
        f"single-job agents <= {TARGET_SINGLE_X_FAIR} x fair share"
    )
    for name in ("corral", "proxy_least_connections"):
        run = r[name]
        typer.echo(f"  {name}")
        for tier, w in run["wait_s"].items():
            typer.echo(
                f"    {tier:12} n {w['n']:4}  p50 {w['p50_s']:7.3f}  p95 {w['p95_s']:7.3f}  "
                f"p99 {w['p99_s']:7.3f}  max {w['max_s']:7.3f}"
            )
        for c, f in run["classes"].items():
            typer.echo(
                f"    class {c:6} {f.get('jobs', 0):4} jobs, {f.get('jobs_per_minute')}/min "
                f"(peak {f.get('peak_jobs_per_minute')}/min), "
                f"peak in flight {f.get('peak_in_flight')}; "
                f"limits {f['limits']}"
            )
        q = run["batch_queued_at_interactive"]
        typer.echo(
            f"    interactive p95 = {run['interactive_p95_x_service']} x service "
            f"(batch queued meanwhile: {q['min']}-{q['max']}); single-job agents: max wait "
            f"{run['single_max_wait_s']} s, worst {run['single_max_x_fair_share']} x fair share; "
            f"met {run['met']}"
        )
        typer.echo(
            f"    makespan {run['makespan_s']} s, lost {run['lost']}, refused {run['refused']}, "
            f"peak in flight {run['peak_in_flight']}"
        )
        typer.echo(
            f"    impatient agents ({CLIENT_TIMEOUT_S:g} s, {CLIENT_ATTEMPTS} tries): "
            f"{run.get('client_timeouts')} timeouts, {run.get('gave_up')} given up; servers "
            f"busy {run.get('server_busy_s')} s, wasted {run.get('wasted_server_s')} s "
            f"(generation nobody received), {run.get('server_cancelled')} requests cancelled"
        )
