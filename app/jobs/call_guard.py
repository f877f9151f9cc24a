"""Closing a running call to Ollama from outside it: when its job is revoked, or it is silent.

A worker thread blocked reading Ollama's answer cannot be interrupted by Python, and Celery's
``revoke(terminate=True)`` does not work with the threads pool. What does work is shutting
down the call's socket from another thread: the blocked read returns at once, the worker
thread sees why (:attr:`Call.reason`), and Ollama, like the simulator, stops generating as
soon as its client's connection closes.

Each call registers a :class:`Call` with its process's :class:`Watchdog`, whose one thread
looks at every call ten times a second: a call whose job was revoked (``is_revoked``) is
closed as cancelled; a call that has been silent for longer than its bound (learned per
instance and model, see ``app.jobs.silence``) is closed as silent. The call's socket is captured
by the connection class of the ``requests`` session (:func:`guarded_session`) when the request
is sent, before the answer's headers arrive: Ollama sends those with its first token, so the
wait for the first token is guarded too.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

log = logging.getLogger(__name__)

#: How often the watchdog looks at the calls: the bound on how late a revoke closes a call.
TICK_S = 0.1

Reason = Literal["cancelled", "silent"]


@dataclass(eq=False)
class Call:
    """One request to Ollama, as the watchdog sees it.

    ``first_s`` is the longest silence allowed before the first chunk, ``gap_s`` between two
    chunks; None leaves the phase to the request's read timeout (nothing learned yet).
    """

    job: str
    first_s: float | None = None
    gap_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    first_at: float | None = None
    last_at: float | None = None
    chunks: int = 0
    reason: Reason | None = None
    #: Set on a silent call when every other call on the instance is silent too.
    all_silent: bool = False
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def chunk(self) -> None:
        """A chunk arrived: the silence clock restarts, with the between-tokens bound."""
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.chunks += 1

    def quiet_for(self, now: float) -> float:
        return now - (self.last_at or self.started)

    def allowed(self) -> float | None:
        """The silence allowed in the current phase."""
        return self.first_s if self.chunks == 0 else self.gap_s

    def overdue(self, now: float) -> bool:
        allowed = self.allowed()
        return allowed is not None and self.quiet_for(now) > allowed

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            aborted = self.reason is not None
        if aborted:  # closed before its request went out
            _shutdown(sock)

    def detach(self) -> None:
        with self._lock:
            self._sock = None

    def abort(self, reason: Reason) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            sock = self._sock
        _shutdown(sock)


def _shutdown(sock: socket.socket | None) -> None:
    # shutdown(), not close(): close() does not wake a thread blocked in recv() on Linux.
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """The calls of one worker process, and the thread that closes them (see module doc)."""

    def __init__(self, is_revoked: Callable[[str], bool]) -> None:
        self._is_revoked = is_revoked
        self._calls: set[Call] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, call: Call) -> Iterator[Call]:
        with self._lock:
            self._calls.add(call)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="corral-call-watchdog", daemon=True
                )
                self._thread.start()
        try:
            yield call
        finally:
            with self._lock:
                self._calls.discard(call)

    def check(self, now: float | None = None) -> None:
        """One look at every call (the thread's tick; public for tests)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            calls = list(self._calls)
        silent = {c for c in calls if c.reason == "silent" or c.overdue(now)}
        for call in calls:
            if call.reason is not None:
                continue
            if self._is_revoked(call.job):
                log.info("job %s was revoked: closing its call", call.job)
                call.abort("cancelled")
            elif call in silent:
                # Every call on the box is silent (or nearly): the box, not this request, is
                # what is wrong, so its breaker opens at once.
                call.all_silent = all(
                    o in silent or o.quiet_for(now) > (o.allowed() or float("inf")) / 2
                    for o in calls
                )
                log.warning(
                    "job %s: no answer for %.1f s (allowed %.1f s): closing its call",
                    call.job,
                    call.quiet_for(now),
                    call.allowed() or 0.0,
                )
                call.abort("silent")

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one bad tick
                log.exception("call watchdog tick failed")


# Capturing the socket of the current call -------------------------------------------------

_current = threading.local()


@contextlib.contextmanager
def current_call(call: Call | None) -> Iterator[None]:
    """Requests made by this thread meanwhile belong to ``call`` (their socket is attached)."""
    _current.call = call
    try:
        yield
    finally:
        _current.call = None
        if call is not None:
            call.detach()


def _attach_current(sock: socket.socket | None) -> None:
    call: Call | None = getattr(_current, "call", None)
    if call is not None:
        call.attach(sock)


class _GuardedHTTPConnection(HTTPConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _attach_current(self.sock)  # the request is sent; the wait for its answer starts
        return super().getresponse(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _attach_current(self.sock)
        return super().getresponse(*args, **kwargs)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def guarded_session() -> requests.Session:
    """A ``requests`` session whose calls can be closed by a :class:`Watchdog`."""
    session = requests.Session()
    adapter = _GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
