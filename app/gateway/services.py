"""Everything a gateway process holds for its lifetime, started and closed with it.

The asyncio clients (Redis, HTTP) belong to the event loop, so they are created in the app's
lifespan, not at import. Blocking work (publishing, revoking, key look-ups) goes to one
thread pool sized by ``gateway_threads``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio
from starlette.requests import Request

from app.celery_app import celery_app
from app.fleet.admin import FleetAdmin
from app.gateway.api_keys import KeyStore
from app.gateway.auth import KeyCache
from app.gateway.fleet_info import FleetInfo
from app.gateway.jobs import JobClient
from app.gateway.results import POOL_WAIT_SECONDS, ResultWatcher
from app.jobs.relay import AsyncTokenRelay
from app.settings import Settings
from app.state import keys as state_keys
from app.state.client import async_client


@dataclass
class Services:
    settings: Settings
    threads: ThreadPoolExecutor
    redis: redis.asyncio.Redis
    http: httpx.AsyncClient
    results: ResultWatcher
    jobs: JobClient
    relay: AsyncTokenRelay
    fleet: FleetInfo
    #: The admin API's fleet changes (registry, then Redis).
    fleet_admin: FleetAdmin
    #: None when auth is off (CORRAL_GATEWAY_AUTH=false).
    keys: KeyCache | None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        threads = ThreadPoolExecutor(settings.gateway_threads, thread_name_prefix="gateway")
        connections = settings.gateway_redis_connections
        results = ResultWatcher(
            settings.result_backend,
            celery_app.backend,
            state_keys.gateway_anchor(settings.namespace),
            connections,
        )
        jobs = JobClient(threads, results, settings.gateway_job_timeout)
        store = KeyStore(settings.database_url)
        # Migrates the database too (keys and registry), and seeds the registry.
        fleet_admin = await jobs.blocking(FleetAdmin.ready)
        await results.start()
        # Each streaming request holds a connection while it waits on its relay.
        client = async_client(
            settings.redis_url, connections, POOL_WAIT_SECONDS, decode_responses=True
        )
        http = httpx.AsyncClient(timeout=10.0)
        return cls(
            settings=settings,
            threads=threads,
            redis=client,
            http=http,
            results=results,
            jobs=jobs,
            relay=AsyncTokenRelay(client, settings.namespace),
            fleet=FleetInfo(http, jobs.blocking),
            fleet_admin=fleet_admin,
            keys=KeyCache(store, settings.gateway_key_cache_ttl, jobs.blocking)
            if settings.gateway_auth
            else None,
        )

    def later(self, work: Any) -> None:
        """Run a coroutine after the request is over (e.g. revoking for a client that left)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.results.close()
        await self.http.aclose()
        await self.redis.aclose()
        self.jobs.close()
        self.threads.shutdown(wait=False, cancel_futures=True)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc
