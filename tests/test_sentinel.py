"""Corral's Redis clients through a Sentinel group on loopback.

A primary, its replica and three Sentinels run here; the clients reach them only through
``sentinel://`` URLs. The primary killed mid-run, with jobs running and more submitted during
the failover, is the multi-host bed's test (``tests/multihost/test_bed.py``): there each of
them runs on a host of its own.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis import RedisError

from app.bench.harness import free_port, wait_until

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

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

    def primary_port(self) -> int:
        sentinel = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def url(self, db: int) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}/{db}" for p in self.sentinel_ports)

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
