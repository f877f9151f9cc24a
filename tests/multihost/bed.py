"""A multi-host test bed on one machine: hosts are network namespaces on one bridge.

Each host is a namespace with its own address on ``10.77.0.0/24``; the bridge's address in the
root namespace (``APP``) is where the test itself runs, as a client on an app host. Every
process is started inside its host's namespace, binds to that host's address, and reaches the
others over the bridge, never over loopback. Recipe and traps: ``../shared/reference/
multihost.md`` (measured on this machine kind).

What runs where (``Bed.start``):

* ``broker-1..3``: a three-node RabbitMQ cluster (Debian's ``rabbitmq-server``, one node per
  host, long names with the address as host part, the machine's Erlang cookie);
* ``state-1``, ``state-2``: the Redis primary and its replica, a Sentinel each, and a third
  Sentinel on ``broker-1`` (three in all, quorum two);
* ``gpu-1..3``: a simulated Ollama server and its instance worker each;
* ``router-1``, ``router-2``: the three tier routers each (two routers per tier at once);
* ``gateway-1``: ``corral gateway`` on its own host, the way clients reach the fleet over HTTP.

Everything started is stopped by PID, and every namespace, link and the bridge removed, by
``Bed.stop`` (also after a failed start).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bench.harness import sim_fleet_toml, wait_until

BRIDGE = "br-corral"
SUBNET = "10.77.0"
APP = f"{SUBNET}.1"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
SENTINEL_SERVICE = "corral"
CHAT = "llama3.2:3b"


@dataclass
class Host:
    name: str
    index: int

    @property
    def addr(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def netns(self) -> str:
        return f"corral-{self.name}"

    @property
    def veth(self) -> str:
        return f"vc{self.index}"  # the bridge's end (interface names: 15 characters at most)

    @property
    def link(self) -> str:
        return f"ec{self.index}"  # the host's end

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _ip("netns", "exec", self.netns, *argv, check=check)

    def cut(self) -> None:
        """Take the host off the network; its processes keep running (a partition)."""
        self.run("ip", "link", "set", self.link, "down")

    def restore(self) -> None:
        self.run("ip", "link", "set", self.link, "up")

    def silence_towards(self, others: list[Host]) -> None:
        """Drop every packet this host sends to ``others`` (blackhole routes: the kernel here
        has no qdiscs for a packet filter). Seen from ``others``, this host goes silent, as
        in a partition: what they send arrives, no answer comes back, and their new
        connections time out."""
        for other in others:
            self.run("ip", "route", "add", "blackhole", f"{other.addr}/32")

    def answer_again(self, others: list[Host]) -> None:
        for other in others:
            self.run("ip", "route", "del", "blackhole", f"{other.addr}/32", check=False)


HOSTS = {
    h.name: h
    for h in [
        Host("broker-1", 11),
        Host("broker-2", 12),
        Host("broker-3", 13),
        Host("state-1", 21),
        Host("state-2", 22),
        Host("gpu-1", 31),
        Host("gpu-2", 32),
        Host("gpu-3", 33),
        Host("router-1", 41),
        Host("router-2", 42),
        Host("gateway-1", 51),
    ]
}
BROKERS = [HOSTS[f"broker-{i}"] for i in (1, 2, 3)]
GPUS = [HOSTS[f"gpu-{i}"] for i in (1, 2, 3)]
ROUTERS = [HOSTS["router-1"], HOSTS["router-2"]]
GATEWAY = HOSTS["gateway-1"]


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=60, check=check)


def reachable(addr: str, port: int) -> bool:
    """Connected, or refused (the host answers): the network path is there."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((addr, port)) in (0, 111)


def listening(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((addr, port)) == 0


def can_run() -> str | None:
    """Why the bed cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "redis-server", "su"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not (RABBIT_BIN / "rabbitmq-server").exists() or not COOKIE.exists():
        return "needs Debian's rabbitmq-server"
    return None


@dataclass
class Bed:
    workdir: Path
    namespace: str
    queue_type: str = "quorum"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sims: list[dict[str, Any]] = field(default_factory=list)

    # -- the network --------------------------------------------------------------------

    def _network(self) -> None:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{APP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in HOSTS.values():
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", host.link)
            _ip("link", "set", host.link, "netns", host.netns)
            _ip("link", "set", host.veth, "master", BRIDGE)
            _ip("link", "set", host.veth, "up")
            host.run("ip", "addr", "add", f"{host.addr}/24", "dev", host.link)
            host.run("ip", "link", "set", host.link, "up")
            host.run("ip", "link", "set", "lo", "up")

    # -- processes ----------------------------------------------------------------------

    def spawn(
        self, name: str, host: Host, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *argv],
            env=env or dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(30)

    # -- RabbitMQ ---------------------------------------------------------------------

    def _rabbit_env(self, host: Host) -> tuple[Path, str]:
        d = self.workdir / f"rabbit-{host.name}"
        return d, (
            f"cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq"
            f" RABBITMQ_CONF_ENV_FILE={d}/rabbitmq-env.conf ERL_EPMD_ADDRESS={host.addr}"
            f" RABBITMQ_USE_LONGNAME=true RABBITMQ_NODENAME=rabbit@{host.addr}"
            f" RABBITMQ_MNESIA_BASE={d}/mnesia RABBITMQ_LOG_BASE={d}/log"
            f" RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf RABBITMQ_PID_FILE={d}/pid"
            f" RABBITMQ_ENABLED_PLUGINS_FILE={d}/enabled_plugins"
        )

    def start_rabbit(self, host: Host) -> None:
        d, env = self._rabbit_env(host)
        d.mkdir(exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {host.addr}:5672\nloopback_users = none\n"
        )
        (d / "rabbitmq-env.conf").write_text(f"ERL_EPMD_ADDRESS={host.addr}\n")
        (d / "enabled_plugins").write_text("[].\n")
        shutil.chown(d, "rabbitmq", "rabbitmq")
        for f in d.iterdir():
            shutil.chown(f, "rabbitmq", "rabbitmq")
        self.spawn(
            f"rabbit-{host.name}",
            host,
            ["su", "rabbitmq", "-s", "/bin/sh", "-c", f"{env} {RABBIT_BIN}/rabbitmq-server"],
        )

    def rabbitmqctl(self, host: Host, *args: str, check: bool = True) -> str:
        _, env = self._rabbit_env(host)
        command = f"{env} {RABBIT_BIN}/rabbitmqctl -n rabbit@{host.addr} {' '.join(args)}"
        done = host.run("su", "rabbitmq", "-s", "/bin/sh", "-c", command, check=check)
        return done.stdout

    def _cluster(self) -> None:
        for host in BROKERS:
            self.start_rabbit(host)
        for host in BROKERS:
            wait_until(lambda h=host: listening(h.addr, 5672), 120, f"RabbitMQ on {host.name}")
        first = BROKERS[0]
        for host in BROKERS[1:]:
            self.rabbitmqctl(host, "stop_app")
            self.rabbitmqctl(host, "join_cluster", f"rabbit@{first.addr}")
            self.rabbitmqctl(host, "start_app")
        wait_until(lambda: self.running_nodes() == 3, 60, "three RabbitMQ nodes clustered")

    def running_nodes(self) -> int:
        status = self.rabbitmqctl(BROKERS[0], "cluster_status", "--formatter", "json", check=False)
        try:
            return len(json.loads(status).get("running_nodes", []))
        except json.JSONDecodeError:
            return 0

    @property
    def broker_url(self) -> str:
        return ";".join(f"amqp://guest:guest@{h.addr}:5672//" for h in BROKERS)

    # -- Redis and Sentinel -------------------------------------------------------------

    def _redis(self) -> None:
        primary, replica = HOSTS["state-1"], HOSTS["state-2"]
        base = ["redis-server", "--port", "6379", "--save", "", "--protected-mode", "no"]
        self.spawn("redis-primary", primary, [*base, "--bind", primary.addr])
        self.spawn(
            "redis-replica",
            replica,
            [*base, "--bind", replica.addr, "--replicaof", primary.addr, "6379"],
        )
        for host in (primary, replica, BROKERS[0]):
            conf = self.workdir / f"sentinel-{host.name}.conf"
            conf.write_text(
                f"bind {host.addr}\nport 26379\nprotected-mode no\n"
                f"sentinel monitor {SENTINEL_SERVICE} {primary.addr} 6379 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 2000\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} 10000\n"
            )
            self.spawn(f"sentinel-{host.name}", host, ["redis-server", str(conf), "--sentinel"])
        for host in (primary, replica, BROKERS[0]):
            wait_until(lambda h=host: listening(h.addr, 26379), 30, f"Sentinel on {host.name}")

    def redis_url(self, db: int) -> str:
        hosts = (HOSTS["state-1"], HOSTS["state-2"], BROKERS[0])
        return ";".join(f"sentinel://{h.addr}:26379/{db}" for h in hosts)

    # -- Corral -------------------------------------------------------------------------

    def corral_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CORRAL_NAMESPACE": self.namespace,
            "CORRAL_CONFIG": "/nonexistent/corral.toml",
            "CORRAL_BROKER_URL": self.broker_url,
            "CORRAL_REDIS_URL": self.redis_url(1),
            "CORRAL_RESULT_BACKEND": self.redis_url(0),
            "CORRAL_REDIS_SENTINEL_MASTER": SENTINEL_SERVICE,
            "CORRAL_QUEUE_TYPE": self.queue_type,
            "CORRAL_INSTANCES": json.dumps(
                [
                    {"name": s["name"], "url": f"http://{s['host']}:{s['port']}", "parallelism": 2}
                    for s in self.sims
                ]
            ),
            "CORRAL_HEARTBEAT_INTERVAL": "0.5",
            "CORRAL_RETRY_BACKOFF": "0.5",
            "CORRAL_RETRY_BACKOFF_MAX": "2",
            "CORRAL_DOWN_COOLDOWN": "3",
            "CORRAL_REQUEST_TIMEOUT": "15",
            "CORRAL_GRANT_LEASE": "10",
            "CORRAL_CACHE_ENABLED": "false",
        }

    def _corral(self) -> None:
        self.sims = [
            {
                "name": host.name,
                "host": host.addr,
                "port": 11434,
                "num_parallel": 2,
                "preloaded": [CHAT],
                "models": [{"name": CHAT, "kind": "chat", "tokens_per_second": 40.0}],
            }
            for host in GPUS
        ]
        for host, sim in zip(GPUS, self.sims, strict=True):
            toml = self.workdir / f"sim-{host.name}.toml"
            toml.write_text(sim_fleet_toml([sim]))
            self.spawn(
                f"sim-{host.name}",
                host,
                [sys.executable, "-m", "app.simulator", "--fleet", str(toml)],
            )
        for host in GPUS:
            wait_until(lambda h=host: listening(h.addr, 11434), 30, f"simulator on {host.name}")
        env = self.corral_env()
        for host in GPUS:
            db = f"sqlite:///{self.workdir}/registry-{host.name}.db"
            self.spawn(
                f"worker-{host.name}",
                host,
                [sys.executable, "-m", "app.cli", "worker", "--instance", host.name],
                {**env, "CORRAL_DATABASE_URL": db},
            )
        for host in ROUTERS:
            db = f"sqlite:///{self.workdir}/registry-{host.name}.db"
            for tier in ("interactive", "normal", "batch"):
                self.spawn(
                    f"router-{tier}-{host.name}",
                    host,
                    [sys.executable, "-m", "app.cli", "router", "--tier", tier],
                    {**env, "CORRAL_DATABASE_URL": db},
                )

        self.spawn(
            "gateway",
            GATEWAY,
            [sys.executable, "-m", "app.cli", "gateway", "--host", GATEWAY.addr, "--no-access-log"],
            {
                **env,
                "CORRAL_DATABASE_URL": f"sqlite:///{self.workdir}/registry-gateway.db",
                "CORRAL_GATEWAY_AUTH": "false",
            },
        )

    @property
    def gateway_url(self) -> str:
        return f"http://{GATEWAY.addr}:11434"

    def ready(self) -> bool:
        """Every instance up in the fleet state, every tier queue consumed by both router
        hosts, the gateway listening."""
        from app.queues import queue_counts, route_queue
        from app.settings import TIERS
        from app.state.fleet import fleet_state

        snap = fleet_state().instances.snapshot()
        up = {i.name for i in snap.instances if i.up(snap.now) and i.models}
        if up != {h.name for h in GPUS}:
            return False
        counts = queue_counts([route_queue(CHAT, t) for t in TIERS])
        routed = all(consumers == len(ROUTERS) for _, consumers in counts.values())
        return routed and listening(GATEWAY.addr, 11434)

    def redis_primary(self) -> str:
        """The primary's address, as the Sentinels say."""
        import redis

        for host in (HOSTS["state-1"], HOSTS["state-2"], BROKERS[0]):
            try:
                sentinel = redis.Redis(host=host.addr, port=26379, socket_timeout=2)
                addr, _ = sentinel.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
                return str(addr)
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no Sentinel answers")

    def queue_home(self, model: str) -> Host:
        """The broker host whose node holds the normal tier's queue of ``model``: a quorum
        queue's leader, or the one node of a classic queue."""
        from app.queues import route_queue

        queue = route_queue(model, "normal")
        column = "leader" if self.queue_type == "quorum" else "pid"
        for host in BROKERS:
            listed = self.rabbitmqctl(
                host, "list_queues", "-q", "--no-table-headers", "name", column, check=False
            )
            for line in listed.splitlines():
                name, _, node = line.partition("\t")
                if name == queue:
                    # rabbit@10.77.0.11 (a leader), <rabbit@10.77.0.11.1796226048.28560.0> (a pid)
                    found = re.search(r"@([0-9.]+?)(?:\.\d+\.\d+\.\d+>|>|$)", node.strip())
                    addr = found.group(1) if found else ""
                    return next(h for h in BROKERS if h.addr == addr)
        raise RuntimeError(f"no node listed for {queue}")

    def served(self) -> int:
        """Requests the GPU hosts' servers have served in all (the same job twice counts
        twice)."""
        return sum(int(self.sim_stats(h)["requests_total"]) for h in GPUS)

    def in_flight(self) -> int:
        return sum(int(self.sim_stats(h)["in_flight"]) for h in GPUS)

    def expect_each_once(
        self, jobs: list[Any], served_before: int, what: str, timeout: float = 120
    ) -> None:
        """Every job of ``jobs`` ends with one result (read through Redis's and the broker's
        outages), no server above its parallelism; prints how many ran twice."""
        from app.bench.harness import results_through_outages
        from app.schemas import InferResult

        done = {
            k: InferResult.model_validate(v)
            for k, v in results_through_outages(jobs, timeout).items()
        }
        assert len(done) == len(jobs), f"{what}: {len(jobs) - len(done)} jobs without a result"
        assert all(r.text for r in done.values())
        ran = self.served() - served_before
        print(f"{what}: {len(jobs)} jobs, {ran} requests served, {ran - len(jobs)} ran twice")
        for host in GPUS:
            assert self.sim_stats(host)["peak_in_flight"] <= 2, host.name

    def sim_stats(self, host: Host) -> dict[str, Any]:
        import requests

        stats: dict[str, Any] = requests.get(
            f"http://{host.addr}:11434/sim/stats", timeout=5
        ).json()
        return stats

    # -- whole ----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._network()
            self._cluster()
            self._redis()
            self._corral()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # then SIGKILL: nothing of a test bed needs saving
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        teardown()


def teardown() -> None:
    """Remove every namespace, link and the bridge of a bed, killing what still runs in a
    namespace (by PID): also what a crashed earlier run left behind."""
    for host in HOSTS.values():
        pids = _ip("netns", "pids", host.netns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", host.veth, check=False)
    _ip("link", "del", BRIDGE, check=False)
