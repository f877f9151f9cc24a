"""Serve simulated Ollama servers: one asyncio loop, one uvicorn server per instance.

A fleet file (``python -m app.simulator --fleet fleet.toml``) is the pydantic dump of
``SimInstance`` with ``instance`` and ``model`` as the array-of-tables names::

    [[instance]]
    name = "sim-a"
    port = 11434
    num_parallel = 2
    speed = 1.0
    preloaded = ["llama3.2:3b"]
    memory_bytes = 8_000_000_000  # optional; loaded models' size_bytes must fit in it

    [[instance.model]]
    name = "llama3.2:3b"
    load_seconds = 1.5

    [[instance.model]]
    name = "nomic-embed-text"
    kind = "embed"

``/sim/refuse`` works by closing the instance's listening socket, so new connections get
ECONNREFUSED (not a timeout), and closing its idle keep-alive connections so pooled clients
notice too; requests already running finish.  The socket is bound again afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import threading
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import uvicorn

from .config import SimInstance, SimModel
from .server import build_app

new_uvloop: Callable[[], asyncio.AbstractEventLoop] | None
try:
    from uvloop import new_event_loop as new_uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    new_uvloop = None

try:
    import httptools  # noqa: F401  (only probing: uvicorn imports it itself)

    _HTTP = "httptools"
except ImportError:  # pragma: no cover
    _HTTP = "h11"

GRACEFUL_SHUTDOWN_S = 1.0
"""How long a stopping server lets requests finish before dropping their connections."""

IDLE_KEEP_ALIVE_S = 3600

log = logging.getLogger(__name__)


class _SimServer(uvicorn.Server):
    """uvicorn server that leaves signals to the fleet and can stop listening for a while."""

    def __init__(self, instance: SimInstance) -> None:
        self.instance = instance
        app = build_app(instance)
        config = uvicorn.Config(
            app,
            host=instance.host,
            port=instance.port,
            loop="uvloop" if new_uvloop else "asyncio",
            http=_HTTP,
            ws="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            proxy_headers=False,
            server_header=False,
            # A backstop (see shutdown()). uvicorn types it int; it is asyncio.wait_for's timeout.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S + 2,  # type: ignore[arg-type]
            # Go's server keeps idle connections open; uvicorn's 5 s default would make
            # pooled clients race the close and see spurious "server disconnected" errors.
            timeout_keep_alive=IDLE_KEEP_ALIVE_S,
        )
        super().__init__(config)
        app.state.refuse = self.refuse
        self._refuse_until = 0.0
        self._reopen: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the fleet stops all its servers on one signal

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Let requests finish for a grace period, then drop the connections still open.

        Dropping them, rather than uvicorn's cancellation of the tasks, ends hung or long
        requests quietly, the way they end when a real Ollama is killed.
        """
        loop = asyncio.get_running_loop()
        drop = loop.call_later(GRACEFUL_SHUTDOWN_S, self._drop_connections)
        try:
            await super().shutdown(sockets)
        finally:
            drop.cancel()

    def _drop_connections(self) -> None:
        for connection in list(self.server_state.connections):
            connection.transport.close()

    def bound_port(self) -> int:
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port

    async def refuse(self, seconds: float) -> None:
        """Refuse new connections for ``seconds``; a call during a refusal extends it."""
        loop = asyncio.get_running_loop()
        self._refuse_until = max(self._refuse_until, loop.time() + seconds)
        if self._reopen is not None:
            return
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        self._reopen = loop.create_task(self._listen_again())

    async def _listen_again(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (delay := self._refuse_until - loop.time()) > 0:
                await asyncio.sleep(delay)
            if self.should_exit:
                return
            # uvicorn types the class as asyncio.Protocol; its protocols take these keywords
            # (uvicorn's own Server ignores the same error).
            protocol = functools.partial(  # type: ignore[call-arg]
                self.config.http_protocol_class,
                config=self.config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
            )
            server = await loop.create_server(
                protocol,
                host=self.config.host,
                port=self.instance.port,
                backlog=self.config.backlog,
            )
            self.servers = [server]
        except OSError:
            log.exception("simulator %s could not listen again", self.instance.name)
        finally:
            self._reopen = None

    async def run_until_exit(self) -> None:
        try:
            await self.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind
            raise RuntimeError(
                f"simulator {self.instance.name} could not listen on "
                f"{self.instance.host}:{self.instance.port}"
            ) from None
        finally:
            if self._reopen is not None:
                self._reopen.cancel()


async def serve_fleet(
    instances: Sequence[SimInstance],
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve ``instances`` on the running loop until SIGINT/SIGTERM or ``stop`` is set.

    Instances with port 0 get a free port, written back to ``instance.port`` before
    ``ready`` is set.
    """
    servers = [_SimServer(instance) for instance in instances]
    tasks = [asyncio.create_task(server.run_until_exit()) for server in servers]

    def stop_all() -> None:
        for server in servers:
            server.should_exit = True

    def on_signal() -> None:
        for server in servers:
            server.force_exit = server.should_exit  # a second signal skips the grace period
        stop_all()

    loop = asyncio.get_running_loop()
    on_main_thread = threading.current_thread() is threading.main_thread()
    watcher: asyncio.Task[None] | None = None
    try:
        while not all(server.started for server in servers):
            failed = next((t for t in tasks if t.done()), None)
            if failed is not None:
                await failed  # raises the startup error
                raise RuntimeError("a simulator stopped during startup")
            await asyncio.sleep(0.01)
        for server in servers:
            server.instance.port = server.bound_port()
        if on_main_thread:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
        if stop is not None:
            watcher = loop.create_task(_wait_for(stop, stop_all))
        if ready is not None:
            ready.set()
        await asyncio.gather(*tasks)
    finally:
        stop_all()
        await asyncio.gather(*tasks, return_exceptions=True)
        if watcher is not None:
            watcher.cancel()
        if on_main_thread:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def _wait_for(event: threading.Event, then: Callable[[], None]) -> None:
    while not event.is_set():
        await asyncio.sleep(0.05)
    then()


def run_fleet(
    instances: Sequence[SimInstance],
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve ``instances`` in one event loop (uvloop if installed) in the current thread.

    Blocks until SIGINT/SIGTERM (when on the main thread) or until ``stop`` is set.
    """
    loop_factory = new_uvloop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_fleet(instances, ready=ready, stop=stop))


def serve(instance: SimInstance) -> None:
    """Serve one instance until SIGINT/SIGTERM."""
    run_fleet([instance])


class FleetThread:
    """A fleet served from a daemon thread, for tests and programs with their own loop.

    ``with FleetThread(instances) as fleet: fleet.url(0)``; every wait is bounded.
    """

    def __init__(self, instances: Sequence[SimInstance]) -> None:
        self.instances = list(instances)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="corral-sim-fleet", daemon=True)

    def _run(self) -> None:
        try:
            run_fleet(self.instances, ready=self._ready, stop=self._stop)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self, timeout: float = 10.0) -> FleetThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"simulator fleet not ready after {timeout}s")
        if self._error is not None:
            raise RuntimeError("simulator fleet failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"simulator fleet still running after {timeout}s")

    def url(self, index: int = 0) -> str:
        instance = self.instances[index]
        return f"http://{instance.host}:{instance.port}"

    def __enter__(self) -> FleetThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def load_fleet_file(path: str | Path) -> list[SimInstance]:
    """Instances from a TOML fleet file (format in the module docstring)."""
    with open(path, "rb") as file:
        data = tomllib.load(file)
    return [SimInstance.model_validate(table) for table in data.get("instance", [])]


def default_demo_fleet(base_port: int = 11434) -> list[SimInstance]:
    """Three instances, sim-a..sim-c on consecutive ports, with llama3.2:3b warm on a and b."""

    def models() -> list[SimModel]:
        return [
            SimModel(
                name="llama3.2:3b",
                size_bytes=2_019_393_189,
                load_seconds=1.5,
                tokens_per_second=60,
                prompt_tokens_per_second=3000,
                family="llama",
                parameter_size="3.2B",
            ),
            SimModel(
                name="qwen2.5:7b",
                size_bytes=4_683_087_332,
                load_seconds=3.0,
                tokens_per_second=25,
                prompt_tokens_per_second=1200,
                family="qwen2",
                parameter_size="7.6B",
            ),
            SimModel(
                name="nomic-embed-text",
                kind="embed",
                size_bytes=274_302_450,
                load_seconds=0.5,
                prompt_tokens_per_second=8000,
                embedding_length=768,
                family="nomic-bert",
                parameter_size="137M",
                quantization_level="F16",
            ),
        ]

    return [
        SimInstance(
            name=f"sim-{letter}",
            port=base_port + offset,
            num_parallel=2,
            models=models(),
            preloaded=["llama3.2:3b"] if letter in "ab" else [],
        )
        for offset, letter in enumerate("abc")
    ]
