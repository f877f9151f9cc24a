"""The raw-ASGI side of one request: reading the body, answering, noticing the client leave.

A raw ASGI app instead of Starlette keeps the per-request cost low (benchmarks push
hundreds of requests per second through one process), and gives direct control over when
the status line goes out: like Ollama, a stream's headers are sent with its first token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .protocol import dumps

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
TEXT = b"text/plain; charset=utf-8"


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class StreamCut(Exception):
    """Raised after part of a body was sent: uvicorn then drops the connection.

    That is the only way an ASGI app can end a response without its terminating chunk,
    which is what the ``cut_stream_rate`` fault needs.  ``hide_stream_cuts`` keeps these
    deliberate aborts out of uvicorn's error log.
    """


class _HideStreamCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


def hide_stream_cuts() -> None:
    """Install (once) the filter that silences uvicorn's report of a StreamCut."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideStreamCuts) for f in logger.filters):
        logger.addFilter(_HideStreamCuts())


class Exchange:
    """One request and its response."""

    __slots__ = (
        "_task",
        "_watcher",
        "disconnected",
        "finished",
        "receive",
        "scope",
        "send",
        "started",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.started = False
        self.finished = False
        self.disconnected = False
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def body(self) -> bytes:
        chunks = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    def watch_disconnect(self) -> None:
        """Cancel the current task if the client goes away before the response is complete.

        Ollama ties every stage of a request to the HTTP request's context, so a client that
        leaves frees its queue place, its load or its slot.  Call after ``body()``.
        """
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        # uvicorn also reports "disconnect" once the response is complete; ignore that one.
        if not self.finished and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def start(self, status: int, content_type: bytes, length: int | None = None) -> None:
        headers = [(b"content-type", content_type)]
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        self.finished = True
        await self.send({"type": "http.response.body", "body": data})

    async def respond(self, status: int, data: bytes, content_type: bytes = JSON) -> None:
        await self.start(status, content_type, len(data))
        await self.finish(data)

    async def json(self, status: int, payload: object) -> None:
        await self.respond(status, dumps(payload).encode())
