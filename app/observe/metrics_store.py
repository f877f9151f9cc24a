"""Counters and histograms summed in Redis, exposed through prometheus-client.

Corral's jobs are recorded by many processes on many hosts (one router per tier, one worker
per instance), so a per-process registry would need one scrape target per process and would
forget its counts on every restart. Instead each process adds its samples to Redis, which
every one of them already reaches, and one exporter reads the sums at scrape time and hands
them to prometheus-client as metric families. A counter is one hash field per label set; a
histogram is one field per (label set, bucket) holding that bucket's own count, plus one for
the sum. A write is one ``MULTI`` of ``HINCRBYFLOAT``s, so a scrape never sees a histogram
whose count and buckets disagree.

The job path does not wait for Redis to count a job: :class:`Flusher` sums a process's samples
in memory and writes them every ``metrics_flush_seconds`` (and when the process exits), one
``MULTI`` for all the jobs in between instead of one round trip per job and stage.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.state import keys

log = logging.getLogger(__name__)

#: The field suffix of a histogram's running sum (bucket fields hold an ``le`` bound).
SUM = "sum"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: a counter, or a histogram when it has buckets."""

    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def values(self, labels: dict[str, str]) -> list[str]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {sorted(labels)}")
        return [str(labels[name]) for name in self.labels]

    def bounds(self) -> list[str]:
        """The ``le`` of each bucket, as Prometheus spells it, ending with +Inf."""
        return [floatToGoString(b) for b in (*self.buckets, math.inf)]


@dataclass
class Batch:
    """The samples one event adds, written together."""

    increments: list[tuple[str, str, float]] = field(default_factory=list)

    def inc(self, spec: MetricSpec, amount: float = 1, **labels: str) -> None:
        self.increments.append((spec.name, json.dumps(spec.values(labels)), amount))

    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None:
        values = spec.values(labels)
        # The first bucket the value fits, +Inf (the last bound) if none does.
        index = next((i for i, le in enumerate(spec.buckets) if value <= le), len(spec.buckets))
        self.increments.append((spec.name, json.dumps([*values, spec.bounds()[index]]), 1))
        self.increments.append((spec.name, json.dumps([*values, SUM]), value))


class MetricStore(Collector):
    """Writes batches to Redis and collects the sums as prometheus-client families."""

    def __init__(self, client: redis.Redis, namespace: str, specs: Sequence[MetricSpec]) -> None:
        self.redis = client
        self.ns = namespace
        self.specs = tuple(specs)

    def _key(self, name: str) -> str:
        return keys.metrics(self.ns, name)

    def write(self, batch: Batch) -> None:
        if not batch.increments:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            # HINCRBYFLOAT for counts too: exact up to 2**53, and any field takes any amount.
            for name, fld, amount in batch.increments:
                pipe.hincrbyfloat(self._key(name), fld, amount)
            pipe.execute()

    def collect(self) -> Iterator[Metric]:
        with self.redis.pipeline(transaction=False) as pipe:
            for spec in self.specs:
                pipe.hgetall(self._key(spec.name))
            rows = pipe.execute()
        for spec, row in zip(self.specs, rows, strict=True):
            yield _histogram(spec, row) if spec.buckets else _counter(spec, row)


def _counter(spec: MetricSpec, row: dict[str, str]) -> Metric:
    family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    for fld, value in sorted(row.items()):
        family.add_metric(json.loads(fld), float(value))
    return family


def _histogram(spec: MetricSpec, row: dict[str, str]) -> Metric:
    counts: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
    for fld, value in row.items():
        *values, bound = json.loads(fld)
        counts[tuple(values)][bound] = float(value)
    family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    for values, by_bound in sorted(counts.items()):
        cumulative, buckets = 0.0, []
        for bound in spec.bounds():
            cumulative += by_bound.get(bound, 0.0)
            buckets.append((bound, cumulative))
        family.add_metric(list(values), buckets, sum_value=by_bound.get(SUM, 0.0))
    return family


class Flusher:
    """Sums a process's samples in memory and writes them to a store every ``interval`` seconds.

    Options: ``store`` (where the sums go), ``interval`` (seconds between writes: what a scrape
    may lag behind the jobs). Hooks: :meth:`add` (from any thread, no I/O), :meth:`flush`
    (a daemon thread calls it; also at interpreter exit, so a worker stopped cleanly loses
    nothing). A write that fails is kept and tried again with the next one; a process killed
    outright loses at most its last ``interval`` of samples, which metrics can afford and the
    job path's round trips could not.
    """

    def __init__(self, store: MetricStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._lock = threading.Lock()
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._pid = 0  # the process whose thread flushes (a forked child starts its own)

    def add(self, batch: Batch) -> None:
        with self._lock:
            for name, fld, amount in batch.increments:
                self._sums[name, fld] += amount
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="metrics-flush", daemon=True).start()
                atexit.register(self.flush)

    def flush(self) -> None:
        with self._lock:
            sums, self._sums = self._sums, defaultdict(float)
        if not sums:
            return
        try:
            self.store.write(Batch([(name, fld, amount) for (name, fld), amount in sums.items()]))
        except redis.RedisError as exc:
            log.warning("job metrics not recorded yet, kept for the next write: %s", exc)
            with self._lock:
                for k, amount in sums.items():
                    self._sums[k] += amount

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            threading.Event().wait(self.interval)
            self.flush()
