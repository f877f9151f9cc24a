"""``corral metrics``: one Prometheus target for the whole fleet.

It serves the fleet gauges (``app.ops.metrics_fleet``) and the job metrics every router and
instance worker summed in Redis (``app.observe.metrics``), both read at scrape time, so any number
of exporters may run (e.g. one per Prometheus replica) and restarting one loses nothing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from app.observe.metrics import job_store
from app.ops.metrics_fleet import FleetCollector


def build_registry() -> CollectorRegistry:
    # A registry of its own: the exporter's process metrics would say nothing about the fleet.
    registry = CollectorRegistry()
    registry.register(FleetCollector())
    registry.register(job_store())
    return registry


def serve(host: str, port: int) -> None:
    """Serve ``/metrics`` until the process is stopped."""
    server, thread = start_http_server(port, addr=host, registry=build_registry())
    try:
        thread.join()
    finally:
        server.shutdown()
