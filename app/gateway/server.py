"""``corral gateway``: serve the gateway with uvicorn (one process, one event loop)."""

from __future__ import annotations

import uvicorn

from app.gateway.app import create_app
from app.observe import logs, tracing


def serve(host: str, port: int, *, log_level: str = "info", access_log: bool = True) -> None:
    logs.configure("gateway", log_level)
    tracing.setup("gateway")
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,  # uvicorn's loggers go through the root handler set up above
        access_log=access_log,
        # Streams and long waits must end when asked to stop, not hold the shutdown forever.
        timeout_graceful_shutdown=10,
    )
