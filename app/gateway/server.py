"""``corral gateway``: serve the gateway with uvicorn (one process, one event loop)."""

from __future__ import annotations

import logging

import uvicorn

from app.gateway.app import create_app

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def serve(host: str, port: int, *, log_level: str = "info", access_log: bool = True) -> None:
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        # Streams and long waits must end when asked to stop, not hold the shutdown forever.
        timeout_graceful_shutdown=10,
    )
