"""The examples in examples/ run as a person runs them, against the session's simulated fleet.

Each web server is a subprocess (``manage.py runserver``, ``flask run``) with the test
session's environment, so its namespace, instances and settings are the fleet's. Every
process is stopped by PID in a finalizer; every wait is bounded.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import states
from celery.events.event import get_exchange
from kombu import Connection, Consumer, Queue

from app.bench.harness import LocalFleet, free_port, wait_until
from app.bench.stack import Child
from app.celery_app import celery_app
from app.settings import get_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: Bodies ``POST /jobs`` must refuse with 400, and a part of the message the client gets.
BAD_REQUESTS = {
    "unknown kind": ({"model": "llama3.2:3b", "kind": "poem", "prompt": "hi"}, "kind: Input"),
    "missing prompt": ({"model": "llama3.2:3b"}, "kind='generate' needs 'prompt'"),
    "bad tier": ({"model": "llama3.2:3b", "prompt": "hi", "tier": "urgent"}, "tier: Input"),
    "unserved model": ({"model": "nope:1b", "prompt": "hi"}, "no instance serves model"),
    "corral's bookkeeping": (
        {"model": "llama3.2:3b", "prompt": "hi", "_route": {"submitted_at": 0, "instance": "x"}},
        "_route: Extra inputs are not permitted",
    ),
    "not an object": (["llama3.2:3b", "hi"], "must be a JSON object"),
}


@dataclass
class Server:
    """One example's web server, and its two endpoints."""

    url: str
    child: Child

    def submit(self, body: Any) -> requests.Response:
        return requests.post(f"{self.url}/jobs", json=body, timeout=10)

    def poll(self, job_id: str) -> requests.Response:
        return requests.get(f"{self.url}/jobs/{job_id}", timeout=10)

    def finished(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The job's view once it is done (succeeded or failed)."""

        def done() -> dict[str, Any] | None:
            view = self.poll(job_id).json()
            return view if view["state"] in states.READY_STATES else None

        return wait_until(done, timeout, f"job {job_id} to finish", every=0.2)

    def log(self) -> str:
        return self.child.log.read_text(errors="replace")


def _serve(name: str, argv: list[str], port: int, workdir: Path) -> Server:
    """Start a server and wait until it answers a poll; it is stopped if it does not."""
    child = Child(name, argv, dict(os.environ), log_dir=workdir)
    child.start()
    server = Server(f"http://127.0.0.1:{port}", child)

    def up() -> bool:
        try:
            return server.poll(str(uuid.uuid4())).status_code == 200
        except requests.RequestException:
            return not child.alive()

    try:
        wait_until(up, 60, f"the {name} example to answer")
    except TimeoutError:
        child.stop()
        raise
    if not child.alive():
        raise RuntimeError(f"the {name} example exited at start:\n{server.log()}")
    return server


@pytest.fixture(scope="module")
def django_server(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, str(EXAMPLES / "django" / "manage.py")]
    argv += ["runserver", "--noreload", f"127.0.0.1:{port}"]
    server = _serve("django", argv, port, tmp_path_factory.mktemp("django"))
    try:
        yield server
    finally:
        server.child.stop()


@pytest.fixture(scope="module")
def flask_server(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", str(EXAMPLES / "flask" / "corral_flask")]
    argv += ["run", "--no-reload", "--host", "127.0.0.1", "--port", str(port)]
    server = _serve("flask", argv, port, tmp_path_factory.mktemp("flask"))
    try:
        yield server
    finally:
        server.child.stop()


@pytest.fixture(params=list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def bad_request(request: pytest.FixtureRequest) -> tuple[Any, str]:
    return BAD_REQUESTS[request.param]


@dataclass
class Published:
    """Jobs published under the session's namespace, by any process: job id -> queue.

    Every publish of a job emits a ``task-sent`` event (Corral sets ``task_send_sent_event``),
    read here from a queue of our own bound to Celery's event exchange.
    """

    conn: Connection
    queues: dict[str, str] = field(default_factory=dict)

    def on_event(self, body: dict[str, Any], message: Any) -> None:
        queue = str(body.get("queue"))
        if queue.startswith(f"{get_settings().namespace}."):
            self.queues.setdefault(body["uuid"], queue)

    def until(self, job_id: str, timeout: float = 20.0, settle: float = 0.5) -> dict[str, str]:
        """Every job published so far, once ``job_id`` is, and ``settle`` seconds more (in
        case a publish on another connection arrives a little later)."""
        deadline = time.monotonic() + timeout
        while job_id not in self.queues:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no task-sent event for job {job_id} in {timeout}s")
            self._drain(1.0)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self._drain(end - time.monotonic())
        return dict(self.queues)

    def _drain(self, seconds: float) -> None:
        with suppress(TimeoutError):
            self.conn.drain_events(timeout=max(seconds, 0.01))


@contextmanager
def _watch() -> Iterator[Published]:
    with celery_app.connection_for_read() as conn:
        published = Published(conn)
        queue = Queue(
            f"{get_settings().namespace}.watch.{uuid.uuid4().hex}",
            get_exchange(conn, celery_app.conf.event_exchange),
            routing_key="task.sent",
            exclusive=True,
            auto_delete=True,
            durable=False,
        )
        with Consumer(conn, [queue], callbacks=[published.on_event], accept=["json"], no_ack=True):
            yield published


@pytest.fixture
def published() -> Iterator[Published]:
    """Watch what is published from now on: ``published.until(job_id)``."""
    with _watch() as watch:
        yield watch
