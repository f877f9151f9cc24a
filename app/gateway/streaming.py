"""Following a streaming job: its relayed chunks as they come, then its outcome.

The instance worker appends every Ollama chunk to the job's relay (``app.jobs.relay``); this
module reads them as they arrive, passes them through :class:`StreamGuard` (no text twice
across retries) and ends with the last chunk (``done: true``). A job answered from the cache
relays nothing: its result is turned into one final chunk. A job that fails raises its error,
after whatever chunks were already yielded. A stream abandoned before its end (the client
hung up, so the server cancels the response) revokes its job: Ollama stops generating for
a client that left, and so does Corral.

:func:`open_stream` waits for the first chunk before the response starts, like Ollama,
which sends its headers with the first token: an error until then gets a real status code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from starlette.requests import Request

from app.gateway import shapes
from app.gateway.dedup import StreamDiverged, StreamGuard
from app.gateway.disconnect import ClientGone, unless_gone
from app.gateway.errors import GatewayError, job_error
from app.gateway.jobs import JobClient
from app.jobs.relay import AsyncTokenRelay

T = TypeVar("T")

#: Longest single wait on the relay (the job's outcome interrupts it); below redis-py's
#: default 5 s socket timeout, which would otherwise cut a blocked read as a dead connection.
READ_BLOCK_MS = 2_000


async def follow(
    jobs: JobClient, relay: AsyncTokenRelay, job_id: str, kind: str
) -> AsyncGenerator[dict[str, Any], None]:
    """The job's chunks in Ollama's shape, ending with the ``done`` one; raises on failure."""
    guard = StreamGuard(kind)
    finished = asyncio.ensure_future(jobs.result(job_id))
    # Its error is re-raised below or is moot (the client left): never "never retrieved".
    finished.add_done_callback(lambda t: t.cancelled() or t.exception())
    reading: asyncio.Future[Any] | None = None
    after = "0"
    yielded = False  # before the first chunk, a client that leaves is open_stream's to handle
    # Set before the done chunk is yielded: the consumer stops at it and closes this
    # generator there, before the job's result is stored; that is the end, not a client
    # who left (revoking then cost a broadcast per stream).
    complete = False
    try:
        while True:
            if finished.done():
                # Whatever the worker relayed before storing the result, then the result.
                while entries := await relay.read(job_id, after, block_ms=None):
                    for entry in entries:
                        after = entry.id
                        chunk = guard.feed((entry.attempt, entry.run), entry.chunk)
                        if chunk is not None:
                            complete = bool(chunk.get("done"))
                            yield chunk
                            if complete:
                                return
                final = guard.feed("result", shapes.completion(finished.result()))
                assert final is not None  # a done chunk is always passed on
                yield final
                return
            reading = asyncio.ensure_future(relay.read(job_id, after, block_ms=READ_BLOCK_MS))
            await asyncio.wait({reading, finished}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():  # finished first: drained at the top of the loop
                reading.cancel()
                continue
            for entry in reading.result():
                after = entry.id
                chunk = guard.feed((entry.attempt, entry.run), entry.chunk)
                if chunk is not None:
                    yielded = True
                    complete = bool(chunk.get("done"))
                    yield chunk
                    if complete:
                        return
    except (asyncio.CancelledError, GeneratorExit):
        if yielded and not complete and not finished.done():
            jobs.cancel_soon(job_id)
        raise
    finally:
        for task in (reading, finished):
            if task is not None and not task.done():
                task.cancel()


def stream_error(exc: BaseException) -> GatewayError:
    """The error line that ends a stream (or the status, before its first chunk)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StreamDiverged):
        return GatewayError(
            502,
            "the job failed mid-stream and was retried on another instance, whose answer"
            " differs from the text already sent; discard the partial answer and send the"
            " request again (temperature 0 or a fixed seed makes such retries seamless)",
            code="stream_diverged",
        )
    return job_error(exc)


async def open_stream(
    request: Request, stream: AsyncGenerator[T, None]
) -> tuple[T, AsyncIterator[T]]:
    """Wait for the first item (its error raised as a GatewayError); return it and the rest.

    If the client disconnects first, ClientGone propagates and the stream is closed.
    """
    try:
        first = await unless_gone(request, anext(stream))
    except ClientGone:
        await stream.aclose()
        raise
    except Exception as exc:
        await stream.aclose()
        raise stream_error(exc) from exc
    return first, stream
