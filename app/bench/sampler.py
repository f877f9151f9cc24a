"""In-flight requests per simulated instance over time, for the benchmark's plot.

A background thread polls each simulator's ``/sim/stats`` about ten times a second. The
simulator counts every request it holds (queued or running), so the series shows directly
whether a balancer ever sent a server more than its parallelism. Polling costs a few small
GETs per tick on one thread, against hundreds of jobs per second on the measured path.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests


class InFlightSampler:
    """``with InFlightSampler(urls, parallelism) as s: ...`` then ``s.series()``."""

    def __init__(
        self, urls: dict[str, str], parallelism: dict[str, int], every_s: float = 0.1
    ) -> None:
        self.urls, self.parallelism, self.every_s = urls, parallelism, every_s
        self._t: list[float] = []
        self._counts: dict[str, list[int]] = {name: [] for name in urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight-sampler", daemon=True)

    def __enter__(self) -> InFlightSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        session = requests.Session()
        next_tick = self._t0
        while True:  # at least one sample, however short the run
            t = time.perf_counter() - self._t0
            try:
                counts = {
                    name: session.get(url + "/sim/stats", timeout=2).json()["in_flight"]
                    for name, url in self.urls.items()
                }
            except requests.RequestException:
                counts = None  # a missed tick is a gap in the plot, not a wrong point
            if counts is not None:
                self._t.append(round(t, 3))
                for name, n in counts.items():
                    self._counts[name].append(n)
            # Behind schedule (a slow poll) means skip ticks, not catch up in a burst.
            next_tick = max(next_tick + self.every_s, time.perf_counter())
            if self._stop.wait(max(0.0, next_tick - time.perf_counter())):
                return

    def series(self) -> dict[str, Any]:
        return {
            "every_s": self.every_s,
            "t": list(self._t),
            "instances": {name: list(v) for name, v in self._counts.items()},
            "parallelism": dict(self.parallelism),
        }
