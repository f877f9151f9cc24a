"""Fleet state, cache and results in a Sentinel group: the primary killed while jobs run.

A primary, its replica and three Sentinels run here on loopback (the multi-host bed runs them
on hosts of their own); the fleet reaches them only through ``sentinel://`` URLs. Killing the
primary mid-run, the Sentinels promote the replica, every Corral process finds it through
redis-py's Sentinel client, and every job ends with one result.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis import RedisError

from app.bench.harness import free_port, own_fleet, results_through_outages, wait_until
from app.schemas import InferResult
from app.settings import get_settings
from app.state.client import redis_client
from tasks import infer

pytestmark = [
    pytest.mark.fleet,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

CHAT = "llama3.2:3b"
SERVICE = "corral"  # the default redis_sentinel_master


class SentinelGroup:
    """A primary, a replica and three Sentinels, each a process of this test's, on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, *args: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        self.procs[name] = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT
        )

    def _redis(self, name: str, port: int, *args: str) -> None:
        self._start(name, "--bind", "127.0.0.1", "--port", str(port), "--save", "", *args)

    def start(self) -> None:
        primary, replica = self.ports["primary"], self.ports["replica"]
        self._redis("primary", primary)
        self._redis("replica", replica, "--replicaof", "127.0.0.1", str(primary))
        for i, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{i}.conf"
            conf.write_text(
                f"bind 127.0.0.1\nport {port}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            self._start(f"sentinel-{i}", str(conf), "--sentinel")
        wait_until(lambda: self.replicated(), 20, "the replica in sync")
        wait_until(lambda: all(self.answers(p) for p in self.sentinel_ports), 20, "sentinels")

    def replicated(self) -> bool:
        info = redis.Redis(port=self.ports["replica"]).info("replication")
        return info.get("master_link_status") == "up"

    def answers(self, port: int) -> bool:
        try:
            return bool(redis.Redis(port=port).sentinel_get_master_addr_by_name(SERVICE))
        except RedisError:
            return False

    def can_fail_over(self) -> bool:
        """Every Sentinel knows the replica and the two others (found within ~10 s)."""
        for port in self.sentinel_ports:
            sentinel = redis.Redis(port=port)
            if (
                not sentinel.sentinel_slaves(SERVICE)
                or len(sentinel.sentinel_sentinels(SERVICE)) < 2
            ):
                return False
        return True

    def primary_port(self) -> int:
        sentinel = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def url(self, db: int) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}/{db}" for p in self.sentinel_ports)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.stop()


def test_primary_killed_mid_run_the_replica_takes_over_and_every_job_ends_once(
    tmp_path: Path, sentinels: SentinelGroup
) -> None:
    sims = [
        {
            "name": name,
            "port": free_port(),
            "num_parallel": 2,
            "preloaded": [CHAT],
            # About 0.4 s a job: 40 jobs on 4 slots keep the fleet busy for 4 s.
            "models": [{"name": CHAT, "kind": "chat", "tokens_per_second": 20.0}],
        }
        for name in ("sen-a", "sen-b")
    ]
    workdir = tmp_path / "fleet"
    workdir.mkdir()
    with own_fleet(
        workdir,
        sims,
        CORRAL_NAMESPACE=f"sen{os.getpid()}",
        CORRAL_REDIS_URL=sentinels.url(1),
        CORRAL_RESULT_BACKEND=sentinels.url(0),
        CORRAL_REDIS_SENTINEL_MASTER=SERVICE,
    ) as fleet:
        assert redis_client(get_settings().redis_url).ping()
        wait_until(sentinels.can_fail_over, 30, "the Sentinels ready to fail over")
        jobs = [
            infer.delay(model=CHAT, prompt=f"sentinel {i}", cache=False, options={"seed": i})
            for i in range(40)
        ]
        wait_until(lambda: sum(j.ready() for j in jobs) >= 4, 30, "the first results")
        old = sentinels.ports["primary"]
        sentinels.kill("primary")
        # Submitted while the Sentinels have yet to notice: each waits for the new primary.
        t = time.monotonic()
        jobs += [infer.delay(model=CHAT, prompt=f"late {i}", cache=False) for i in range(10)]
        running = len(jobs) - sum(j.ready() for j in jobs)
        print(f"10 jobs submitted during the failover in {time.monotonic() - t:.1f} s")
        wait_until(lambda: sentinels.primary_port() != old, 30, "the replica promoted")
        done = {
            k: InferResult.model_validate(v).text
            for k, v in results_through_outages(jobs, 120).items()
        }
        assert len(done) == len(jobs), f"{len(jobs) - len(done)} jobs without a result"
        assert all(done.values())
        ran = int(fleet.sim_total("requests_total"))
        print(f"{len(jobs)} jobs, {ran} requests served: {ran - len(jobs)} ran twice")
        assert running > 20, "the primary died after most jobs had ended"
        for name in fleet.sim_urls:
            assert fleet.sim_stats(name)["peak_in_flight"] <= 2, name


def test_the_gateways_asyncio_clients_reach_the_primary_and_wait_for_a_connection(
    sentinels: SentinelGroup,
) -> None:
    """The gateway's clients (relay reader, result watcher) through the same URLs."""
    import asyncio

    from app.state.client import async_client

    async def use() -> list[str | None]:
        client = async_client(sentinels.url(1), 1, 5.0, decode_responses=True)
        await client.set("corral-sentinel-test", "here")
        # One connection for three callers: they take turns instead of failing.
        got = await asyncio.gather(*(client.get("corral-sentinel-test") for _ in range(3)))
        await client.aclose()
        return list(got)

    assert asyncio.run(use()) == ["here"] * 3
    primary = redis.Redis(port=sentinels.primary_port(), db=1)
    assert primary.get("corral-sentinel-test") == b"here"
