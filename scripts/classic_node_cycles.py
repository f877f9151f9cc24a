"""Stop and start the classic queues' RabbitMQ node over and over in the multi-host bed, 40
jobs each time, and stop at the first time a job does not end (the broker's view of the
queues and channels is printed, the bed's logs kept in $TMPDIR/corral-cycles-logs).

    .venv/bin/python scripts/classic_node_cycles.py [CYCLES] [SECONDS_DOWN]

Root and Debian's rabbitmq-server needed, as for the bed (tests/multihost). About 30-45 s a
cycle after a 40 s build. It found the instance worker left without a consumer
(app/jobs/consumer_watch.py), which the bed's one stop in its test catches in 2 runs of 5.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.bench.harness import settings_from, wait_until
from tests.multihost.bed import CHAT, Bed, teardown

KEPT = Path(tempfile.gettempdir()) / "corral-cycles-logs"


def one_stop(bed: Bed, cycle: int, down_s: float) -> int:
    """Stop the node with 40 jobs queued and running; how many did not end 120 s after."""
    from tasks import infer

    jobs = [infer.delay(model=CHAT, prompt=f"c{cycle} {i}", cache=False) for i in range(40)]
    wait_until(lambda: sum(j.ready() for j in jobs) >= 4, 30, "the first results")
    home = bed.queue_home(CHAT)
    bed.rabbitmqctl(home, "stop_app")
    time.sleep(down_s)
    bed.rabbitmqctl(home, "start_app")
    back = time.monotonic()
    try:
        wait_until(lambda: all(j.ready() for j in jobs), 120, "every job")
    except TimeoutError:
        print(bed.rabbitmqctl(home, "list_queues", "name", "messages_ready", "consumers"))
        return sum(not j.ready() for j in jobs)
    print(f"cycle {cycle}: every job ended, {time.monotonic() - back:.0f} s after", flush=True)
    return 0


def cycles(bed: Bed, count: int, down_s: float) -> bool:
    for cycle in range(count):
        if stuck := one_stop(bed, cycle, down_s):
            print(f"cycle {cycle}: {stuck} jobs did not end")
            return False
    return True


def main(count: int, down_s: float) -> int:
    teardown()
    workdir = Path(tempfile.mkdtemp(prefix="corral-bed-"))
    os.chmod(workdir, 0o755)  # the RabbitMQ nodes run as the rabbitmq user
    bed = Bed(workdir, namespace=f"mh{os.getpid()}c", queue_type="classic")
    ok = False
    try:
        bed.start()
        env = {k: v for k, v in bed.corral_env().items() if k.startswith("CORRAL_")}
        with settings_from(env):
            wait_until(bed.ready, 120, "workers and routers of the bed", every=0.5)
            ok = cycles(bed, count, down_s)
    finally:
        bed.stop()
        if not ok:
            shutil.rmtree(KEPT, ignore_errors=True)
            shutil.copytree(workdir, KEPT, ignore=shutil.ignore_patterns("mnesia"))
            print(f"the bed's logs: {KEPT}")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(int(args[0]) if args else 20, float(args[1]) if len(args) > 1 else 15.0))
