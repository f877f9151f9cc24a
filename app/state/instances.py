"""The registry of instances in Redis: one hash per instance, and the sets that index them.

An instance's hash holds what the routers rank it by: its registry row (pushed here by its
worker and by ``corral fleet``; changes land here first), its slot counter, its health and
its host's load (heartbeats), and what Corral learned of it (service times, load times,
silence statistics, as moving averages). ``snapshot`` reads them all in one round trip for
the routers (``routing.FleetSnapshot``). The slot counter, the breaker and the rate bucket in
the same hash are changed only by the slot scripts (:mod:`app.state.slots`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from app.settings import InstanceConfig, get_settings
from app.state import keys
from app.state.averages import Averages
from app.state.scripts import script
from routing import FleetSnapshot, InstanceStats


@dataclass(frozen=True)
class Instances:
    redis: redis.Redis
    ns: str
    averages: Averages

    def register(
        self,
        config: InstanceConfig,
        *,
        threads: int | None = None,
        models: list[str] | None = None,
    ) -> int:
        """Add or update an instance from its registry row; keeps its slot count and stats.

        ``threads`` is given by the instance's worker (its thread count, fixed at its start),
        and remembered: the capacity the routers use is the parallelism, capped by it. The
        served models are ``models`` (discovered), else the row's, else left as they are.
        Returns the capacity.
        """
        key = keys.instance(self.ns, config.name)
        if threads is None:
            known = self.redis.hget(key, "threads")
            threads = int(known) if known else None
        capacity = min(config.parallelism, threads or config.parallelism)
        fields: dict[FieldT, EncodableT] = {
            "url": config.url,
            "capacity": capacity,
            "max_loaded": config.max_loaded_models,
            "memory": config.memory_bytes or 0,  # 0: none (a hash holds no None)
            "weight": config.weight,
            "role": config.role,
            "priority": config.priority,
            "rate_per_minute": config.rate_limit_per_minute or 0,
            "enabled": int(config.enabled),
            "config": config.model_dump_json(),
        }
        if threads is not None:
            fields["threads"] = threads
        with self.redis.pipeline() as pipe:
            pipe.sadd(keys.instances(self.ns), config.name)
            pipe.hset(key, mapping=fields)
            pipe.hsetnx(key, "in_flight", 0)
            pipe.hsetnx(key, "healthy", 1)
            pipe.execute()
        if models is not None or config.models is not None:
            self.set_models(config.name, models if models is not None else config.models or [])
        return capacity

    def unregister(self, name: str) -> None:
        """Remove an instance: the routers stop seeing it at once."""
        key = keys.instance(self.ns, name)
        with self.redis.pipeline() as pipe:
            pipe.srem(keys.instances(self.ns), name)
            pipe.delete(key, keys.instance_models(self.ns, name))
            pipe.execute()
        self._refresh_model_index()

    def set_models(self, name: str, models: list[str]) -> None:
        key = keys.instance(self.ns, name)
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.instance_models(self.ns, name))
            if models:
                pipe.sadd(keys.instance_models(self.ns, name), *models)
            pipe.hset(key, "models", json.dumps(sorted(models)))
            pipe.execute()
        self._refresh_model_index()

    def _refresh_model_index(self) -> None:
        names = cast(set[str], self.redis.smembers(keys.instances(self.ns)))
        sets = [keys.instance_models(self.ns, n) for n in names]
        if sets:
            self.redis.sunionstore(keys.models(self.ns), sets)
        else:
            self.redis.delete(keys.models(self.ns))

    def report_health(
        self,
        name: str,
        *,
        healthy: bool,
        loaded: list[str],
        host_pressure: float = 0.0,
        host_cpu: float = 0.0,
        host_mem: float = 0.0,
        probe_ms: float = 0.0,
        sizes: dict[str, float] | None = None,
        now: float | None = None,
    ) -> None:
        """A heartbeat: the server's health, the models' sizes it reported (bytes; None: left
        as they are), and the load of the host its worker runs on."""
        fields: dict[FieldT, EncodableT] = {
            "healthy": int(healthy),
            "loaded": json.dumps(sorted(loaded)),
            "host_pressure": host_pressure,
            "host_cpu": host_cpu,
            "host_mem": host_mem,
            "probe_ms": probe_ms,
            "last_seen": now or time.time(),
        }
        if sizes is not None:
            fields["sizes"] = json.dumps(sizes, sort_keys=True)
        self.redis.hset(keys.instance(self.ns, name), mapping=fields)

    def record_load(self, name: str, model: str, ms: float) -> None:
        """How long ``model`` took to load on the instance, learned from a cold start."""
        self.averages.fold(keys.instance(self.ns, name), {f"load:{model}": ms})

    def loading(self, name: str, model: str, since: float | None) -> None:
        """A job or a preload on the instance is loading ``model`` since ``since`` (None: no
        longer)."""
        key = keys.instance(self.ns, name)
        if since is None:
            self.redis.hdel(key, f"loading:{model}")
        else:
            self.redis.hset(key, f"loading:{model}", since)

    def silence_stats(self, name: str, model: str) -> dict[str, float | bool | None]:
        """What ``app.jobs.silence`` learned of ``model`` on the instance, and whether it is loaded.

        ``ttft``: seconds to the first token beyond load and prompt evaluation; ``pe``:
        seconds of prompt evaluation per evaluated token; ``gap``: seconds between chunks;
        ``load``: seconds a cold load took (``record_load``); None where nothing was learned.
        """
        return self.parse_silence_stats(model, self.read_silence_stats(name, model))

    def read_silence_stats(
        self, name: str, model: str, client: Pipeline | None = None
    ) -> list[str | None]:
        """The raw fields of ``silence_stats``; queued on ``client`` if given."""
        fields = [f"ttft:{model}", f"pe:{model}", f"gap:{model}", f"load:{model}", "loaded"]
        return cast(
            list[str | None], (client or self.redis).hmget(keys.instance(self.ns, name), fields)
        )

    @staticmethod
    def parse_silence_stats(model: str, raw: list[str | None]) -> dict[str, float | bool | None]:
        ttft, pe, gap, load_ms, loaded = raw
        return {
            "ttft": float(ttft) if ttft else None,
            "pe": float(pe) if pe else None,
            "gap": float(gap) if gap else None,
            "load": float(load_ms) / 1000 if load_ms else None,
            "loaded": model in json.loads(loaded or "[]"),
        }

    def set_version(self, name: str, version: str) -> None:
        self.redis.hset(keys.instance(self.ns, name), "version", version)

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.redis.hset(keys.instance(self.ns, name), "enabled", int(enabled))

    def in_flight(self, name: str) -> int:
        """Jobs holding a slot on the instance: running, or queued for it."""
        return int(self.redis.hget(keys.instance(self.ns, name), "in_flight") or 0)

    def served_models(self) -> set[str]:
        return cast(set[str], self.redis.smembers(keys.models(self.ns)))

    def instance_names(self) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.instances(self.ns))))

    def snapshot(self, now: float | None = None, *, waiting_for: str = "") -> FleetSnapshot:
        """The fleet as the routers rank it, read in one round trip (``lua/snapshot.lua``).

        With ``waiting_for`` (a model), its ``backlog`` holds that model's waiting jobs as
        of this reading: the jobs held by router threads, which are all of a backlog's last
        ones, so ``smart`` decides its end game on a current count.
        """
        ns = self.ns
        strategy_pairs, waiting, *listed = script(self.redis, "snapshot.lua")(
            keys=[keys.instances(ns), keys.strategy(ns), keys.waiters(ns, waiting_for)],
            args=[keys.instance(ns, "")],
        )
        stale = 3 * get_settings().heartbeat_interval
        rows = sorted(zip(listed[::2], listed[1::2], strict=True))
        return FleetSnapshot(
            tuple(_stats(name, _pairs(pairs), stale) for name, pairs in rows if pairs),
            now or time.time(),
            _pairs(strategy_pairs),
            backlog={waiting_for: int(waiting)} if waiting_for else {},
        )

    def set_strategy(self, strategy: str | None, model: str = "*") -> None:
        """Change the routing strategy live (for one model, or "*" for all); None resets."""
        if strategy is None:
            self.redis.hdel(keys.strategy(self.ns), model)
        else:
            self.redis.hset(keys.strategy(self.ns), model, strategy)

    def instance_config(self, name: str) -> InstanceConfig | None:
        """The instance's registry row as last pushed into Redis (changes land here first)."""
        row = self.redis.hget(keys.instance(self.ns, name), "config")
        return InstanceConfig.model_validate_json(row) if row else None

    def is_registered(self, name: str) -> bool:
        """Whether the routers can see the instance: listed, with its row and its models.

        Each part is checked, not one standing for all: Redis may have lost some keys and
        not others (a failover mid-write, keys deleted by hand), and an instance whose row
        survived but not its place in the list would hold its slot count out of sight.
        """
        key = keys.instance(self.ns, name)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sismember(keys.instances(self.ns), name)
            pipe.hget(key, "capacity")
            pipe.hget(key, "models")
            pipe.exists(keys.instance_models(self.ns, name))
            listed, capacity, models, models_set = pipe.execute()
        has_models = bool(models_set) or models in (None, "[]")
        return bool(listed) and capacity is not None and has_models

    def mark_stale(self, name: str) -> None:
        """The instance's worker stops: make its heartbeat stale at once, so routers stop
        sending it jobs."""
        self.redis.hset(keys.instance(self.ns, name), "last_seen", 0)

    def row(self, name: str) -> dict[str, str]:
        """The instance's whole hash, as stored (``corral fleet show``)."""
        return cast(dict[str, str], self.redis.hgetall(keys.instance(self.ns, name)))

    def field(self, names: list[str], field: str) -> list[str | None]:
        """One field of several instances' hashes (``url``, ``completed``...), one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(keys.instance(self.ns, name), field)
            return cast(list[str | None], pipe.execute())


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as Lua hands it back: field, value, field, value..."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _stats(name: str, row: dict[str, str], stale_after: float) -> InstanceStats:
    return InstanceStats(
        name=name,
        capacity=int(row.get("capacity", 0)),
        in_flight=int(row.get("in_flight", 0)),
        models=frozenset(json.loads(row.get("models", "[]"))),
        loaded=frozenset(json.loads(row.get("loaded", "[]"))),
        enabled=row.get("enabled") == "1",
        healthy=row.get("healthy", "1") == "1",
        down_until=float(row.get("down_until", 0)),
        weight=float(row.get("weight", 1)),
        role=row.get("role", "both"),
        ewma_ms=float(row.get("ewma_ms", 0)),
        model_ewma_ms={k[5:]: float(v) for k, v in row.items() if k.startswith("ewma:")},
        load_ms={k[5:]: float(v) for k, v in row.items() if k.startswith("load:")},
        recent_errors=int(row.get("errors", 0)),
        host_pressure=float(row.get("host_pressure", 0)),
        host_cpu=float(row.get("host_cpu", 0)),
        host_mem=float(row.get("host_mem", 0)),
        probe_ms=float(row.get("probe_ms", 0)),
        expires_at=float(row.get("last_seen", 0)) + stale_after,
        breaker=row.get("breaker", "closed"),
        priority=int(row.get("priority", 5)),
        max_loaded=int(row.get("max_loaded", 3)),
        memory=float(row.get("memory") or 0) or None,
        sizes=json.loads(row.get("sizes", "{}")),
        loading={k[8:]: float(v) for k, v in row.items() if k.startswith("loading:")},
    )
