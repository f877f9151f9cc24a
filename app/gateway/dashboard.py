"""The fleet dashboard: ``GET /dashboard`` (a page) and ``GET /dashboard/data`` (its JSON).

The page is one self-contained HTML file (``dashboard.html``: markup, styles and a small
script, nothing fetched from elsewhere) that polls ``/dashboard/data`` every second and
updates itself in place. The page holds no fleet data, so it answers without a key; the
data needs one like every other path. The page sends the key kept in the browser's
localStorage, put there by a link ``/dashboard#key=<key>`` (a fragment: the key never
reaches a server log) or typed into the form it shows when the gateway answers 401.

However many pages poll, a gateway reads the fleet at most once a second: concurrent
requests share one read, and a read less than ``FRESH_FOR`` old is served again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

import redis
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse

from app.gateway.blocking import Blocking
from app.gateway.dashboard_data import DashboardData, QueueDepths, read
from app.gateway.errors import GatewayError
from app.settings import TIERS

#: Seconds a read of the fleet is served again before the next read.
FRESH_FOR = 1.0
#: Seconds of history the jobs-per-second rates are computed over.
RATE_WINDOW = 5.0
DATA_PATH = "/dashboard/data"


class RateMeter:
    """Per-instance jobs finished per second, from their counters over ``window`` seconds."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def rates(self, now: float, counts: dict[str, int]) -> dict[str, float]:
        self._samples.append((now, counts))
        # Keep the newest sample at least a window old: the rate spans the whole window.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        then, before = self._samples[0]
        if now <= then:
            return dict.fromkeys(counts, 0.0)
        # A counter that went down was reset (its instance removed and added): no rate.
        return {name: max(n - before.get(name, n), 0) / (now - then) for name, n in counts.items()}


class DashboardFeed:
    """The latest read of the fleet, shared by every request of this gateway."""

    def __init__(self, blocking: Blocking, broker_url: str) -> None:
        self._blocking = blocking
        self._depths = QueueDepths(broker_url)
        self._rates = RateMeter(RATE_WINDOW)
        self._lock = asyncio.Lock()
        self._latest: DashboardData | None = None
        self._read_at = 0.0

    async def data(self) -> DashboardData:
        async with self._lock:
            if self._latest is None or time.monotonic() - self._read_at >= FRESH_FOR:
                try:
                    latest = await self._blocking(read, self._depths)
                except redis.RedisError as exc:
                    raise GatewayError(503, f"fleet state unreadable (Redis): {exc}") from None
                rates = self._rates.rates(
                    time.monotonic(), {i.name: i.completed for i in latest.instances}
                )
                for row in latest.instances:
                    row.jobs_per_s = round(rates[row.name], 2)
                latest.jobs_per_s = round(sum(rates.values()), 2)
                self._latest, self._read_at = latest, time.monotonic()
            return self._latest

    async def close(self) -> None:
        async with self._lock:
            await self._blocking(self._depths.close)


class _QuietPolls(logging.Filter):
    """Drops the access-log line of each answered poll: one a second per open page would
    drown the lines of the requests that matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access line: (client, method, path, http version, status).
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5):
            return True
        return not (args[2] == DATA_PATH and args[4] == 200)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs inside the app's own lifespan, so its services are started already.
    svc = app.state.services
    app.state.dashboard = DashboardFeed(svc.jobs.blocking, svc.settings.broker_url)
    quiet = _QuietPolls()
    logging.getLogger("uvicorn.access").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("uvicorn.access").removeFilter(quiet)
        await app.state.dashboard.close()


router = APIRouter(prefix="/dashboard", tags=["dashboard"], lifespan=_lifespan)
#: The page, with a queue column per tier (the script reads the tiers from these headers).
PAGE = (
    files(__package__)
    .joinpath("dashboard.html")
    .read_text(encoding="utf-8")
    .replace(
        "<!-- tiers -->",
        "".join(f'<th class="num" data-tier="{t}">{t}</th>' for t in TIERS),
    )
)


@router.get("", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})


@router.get("/data")
async def data(request: Request) -> DashboardData:
    feed: DashboardFeed = request.app.state.dashboard
    return await feed.data()
