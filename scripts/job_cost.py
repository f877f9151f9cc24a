"""What one job costs the control plane: CPU by process, Redis commands, broker messages.

Starts the overhead scenario's zero-latency fleet (three simulated instances, one router per
tier, an instance worker each), warms it with 100 jobs, reads what the idle fleet costs a
second (heartbeats, health checks: the part that grows with the number of instances), then
submits N batch jobs at once with ``infer.submit_many`` and reads, before and after:

* every process's CPU time (user + system, from /proc). On a 2-core machine the sum bounds
  the throughput: 2,000 ms of CPU a second divided by the CPU a job costs;
* Redis's ``INFO commandstats``: every command, those run inside Lua scripts included, and
  the scripts called (EVALSHA), each one round trip or part of a pipeline;
* RabbitMQ's global counters (``rabbit_global_counters:overview()``): messages published,
  routed to a queue, delivered to a consumer.

The README's table "What a job costs, and 100 or 1,000 instances" comes from its output.
With ``--spy PATTERN`` it also records the process whose command line holds PATTERN with
py-spy (``--gil``: only the thread holding the GIL, which is the CPU the process spends in
Python) and prints where that time went.

    .venv/bin/python scripts/job_cost.py [N] [--spy "router --tier batch"]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Processes outside the fleet that still serve every job.
SERVICES = {"beam.smp": "rabbitmq", "redis-server": "redis"}


def _role(proc: psutil.Process) -> str | None:
    if proc.pid == os.getpid():
        return "client (submit_many, .get)"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    for needle, role in SERVICES.items():
        if needle in cmd:
            return role
    if "app.simulator" in cmd:
        return "simulator"
    if "app.cli " in cmd:  # "router --tier batch", "worker --instance bench-a"
        return cmd.split("app.cli ", 1)[1].split(" --loglevel")[0]
    return None


def cpu_times() -> dict[tuple[int, str], float]:
    out = {}
    for proc in psutil.process_iter():
        role = _role(proc)
        if role is None:
            continue
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[(proc.pid, role)] = t.user + t.system
    return out


def redis_counts() -> collections.Counter[str]:
    """Calls per Redis command since it started (scripts' own commands included)."""
    from app.state.client import redis_client

    stats = redis_client(_redis_url()).info("commandstats")
    return collections.Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})


def _redis_url() -> str:
    from app.settings import get_settings

    return get_settings().redis_url


def broker_counts() -> collections.Counter[str]:
    """RabbitMQ's global counters: messages received (published), routed, delivered."""
    out = subprocess.run(
        ["rabbitmqctl", "eval", "rabbit_global_counters:overview()."],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found: collections.Counter[str] = collections.Counter()
    for name, value in re.findall(r"(messages_[a-z_]+_total) => (\d+)", out):
        found[name] += int(value)  # summed over the queue types
    return found


def _per(delta: collections.Counter[str], n: float) -> dict[str, float]:
    return {k: v / n for k, v in delta.most_common() if v > 0}


def hot_spots(raw: Path, top: int = 25) -> list[tuple[float, str]]:
    """py-spy's raw samples: each function's share of them, counting a frame once a sample."""
    share: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        for name in {frame.split(" (")[0] for frame in stack.split(";")}:
            share[name] += n
    return [(100 * n / max(total, 1), name) for name, n in share.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="?", type=int, default=2000)
    parser.add_argument("--spy", default="", help="record this process with py-spy")
    args = parser.parse_args()

    from app.bench.overhead import MODEL, _bench_stack

    with _bench_stack() as fleet:
        from tasks import infer

        warm = [{"model": MODEL, "prompt": f"warm {i}", "tier": "batch"} for i in range(100)]
        for r in infer.submit_many(warm):
            r.get(timeout=120)
        instances = len(fleet.sim_urls)
        idle_s = 10.0
        idle_redis, idle_broker, idle_cpu = redis_counts(), broker_counts(), cpu_times()
        time.sleep(idle_s)
        idle_redis = redis_counts() - idle_redis
        idle_broker = broker_counts() - idle_broker
        idle_cpu_end = cpu_times()
        before, redis_before, broker_before = cpu_times(), redis_counts(), broker_counts()
        spy, raw = None, Path(tempfile.mkdtemp()) / "spy.txt"
        if args.spy:
            pid = next(pid for (pid, role) in before if args.spy in role)
            py_spy = Path(sys.executable).parent / "py-spy"
            command = [str(py_spy), "record", "-p", str(pid), "-o", str(raw), "-f", "raw"]
            spy = subprocess.Popen([*command, "-r", "500", "--gil"])
            time.sleep(1)
        started = time.perf_counter()
        jobs = [{"model": MODEL, "prompt": f"job {i}", "tier": "batch"} for i in range(args.jobs)]
        for r in infer.submit_many(jobs):
            r.get(timeout=600)
        elapsed = time.perf_counter() - started
        after, redis_after, broker_after = cpu_times(), redis_counts(), broker_counts()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)

    per_role: collections.Counter[str] = collections.Counter()
    for key, cpu in after.items():
        per_role[key[1]] += cpu - before.get(key, 0.0)
    print(f"{args.jobs} jobs in {elapsed:.2f} s = {args.jobs / elapsed:.1f} jobs/s")
    print("CPU per job, by process:")
    for role, cpu in per_role.most_common():
        print(f"  {1000 * cpu / args.jobs:6.2f} ms  {role}")
    total = sum(per_role.values())
    bound = (os.cpu_count() or 1) * args.jobs / total
    print(f"  {1000 * total / args.jobs:6.2f} ms  in all: at most {bound:.0f} jobs/s here")
    redis_job = redis_after - redis_before
    scripts = sum(v for k, v in redis_job.items() if k in ("evalsha", "eval", "fcall"))
    print(
        f"Redis per job: {sum(redis_job.values()) / args.jobs:.1f} commands"
        f" ({scripts / args.jobs:.1f} of them script calls):"
    )
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in _per(redis_job, args.jobs).items()))
    print("RabbitMQ per job (messages):")
    print(
        "  "
        + ", ".join(
            f"{k} {v:.2f}" for k, v in _per(broker_after - broker_before, args.jobs).items()
        )
    )
    idle_cpu_s = sum(idle_cpu_end.get(k, 0.0) - v for k, v in idle_cpu.items())
    per_instance = idle_s * instances
    print(f"Idle fleet, per instance and second ({instances} instances, {idle_s:.0f} s, no jobs):")
    print(
        f"  Redis {sum(idle_redis.values()) / per_instance:.1f} commands,"
        f" RabbitMQ {idle_broker['messages_received_total'] / per_instance:.2f} messages"
        f" published, CPU {1000 * idle_cpu_s / per_instance:.1f} ms (every process)"
    )
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in _per(idle_redis, per_instance).items()))
    if spy is not None and raw.exists():
        print(f"py-spy, {args.spy!r}: share of its GIL-holding samples per function")
        for pct, name in hot_spots(raw):
            print(f"  {pct:5.1f} %  {name}")


if __name__ == "__main__":
    main()
