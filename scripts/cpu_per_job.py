"""Where the CPU goes: each process's CPU time per job over a burst of jobs.

Starts the overhead scenario's zero-latency fleet (three simulated instances, one router per
tier, an instance worker each), warms it with 100 jobs, then submits N batch jobs at once
with ``infer.submit_many`` and reads every process's CPU time (user + system, from /proc)
before and after. On a 2-core machine the sum bounds the throughput: 2,000 ms of CPU a
second divided by the CPU a job costs. With ``--spy PATTERN`` it also records the process
whose command line holds PATTERN with py-spy (``--gil``: only the thread holding the GIL,
which is the CPU the process spends in Python) and prints where that time went.

    .venv/bin/python scripts/cpu_per_job.py [N] [--spy "router --tier batch"]
"""

from __future__ import annotations

import argparse
import collections
import os
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

    with _bench_stack():
        from tasks import infer

        warm = [{"model": MODEL, "prompt": f"warm {i}", "tier": "batch"} for i in range(100)]
        for r in infer.submit_many(warm):
            r.get(timeout=120)
        before = cpu_times()
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
        after = cpu_times()
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
    if spy is not None and raw.exists():
        print(f"py-spy, {args.spy!r}: share of its GIL-holding samples per function")
        for pct, name in hot_spots(raw):
            print(f"  {pct:5.1f} %  {name}")


if __name__ == "__main__":
    main()
