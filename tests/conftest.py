"""Shared fixtures. Settings come from the environment, so it is set before anything imports
them: every test session gets a namespace of its own (its own queues and Redis keys)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.bench.harness import LocalFleet, free_port, instances_env
from app.state import keys

NAMESPACE = f"ct{os.getpid()}"
SIM_MODELS = [
    {
        "name": "llama3.2:3b",
        "kind": "chat",
        "tokens_per_second": 400.0,
        "default_num_predict": 8,
        "load_seconds": 0.2,
    },
    {"name": "nomic-embed-text", "kind": "embed", "load_seconds": 0.1},
]
SIMS = [
    {
        "name": name,
        "port": free_port(),
        "num_parallel": 2,
        "preloaded": ["llama3.2:3b", "nomic-embed-text"],
        "models": SIM_MODELS,
    }
    for name in ("sim-a", "sim-b", "sim-c")
]

SESSION_DIR = Path(tempfile.gettempdir()) / f"corral-tests-{os.getpid()}"
os.environ.update(
    {
        "CORRAL_NAMESPACE": NAMESPACE,
        "CORRAL_CONFIG": "/nonexistent/corral.toml",
        "CORRAL_INSTANCES": instances_env(SIMS),
        "CORRAL_HEARTBEAT_INTERVAL": "0.5",
        "CORRAL_RETRY_BACKOFF": "0.1",
        "CORRAL_RETRY_BACKOFF_MAX": "0.5",
        "CORRAL_DOWN_COOLDOWN": "3",
        "CORRAL_REQUEST_TIMEOUT": "10",
        # Some tests hang or slow every instance on purpose for seconds (chaos): learned
        # silence bounds are tested on a fleet of their own (test_silence.py), not here.
        "CORRAL_SILENCE_FLOOR_S": "30",
        "CORRAL_GRANT_LEASE": "20",
        "CORRAL_ROUTER_CONCURRENCY": "16",
        # A burst in one test must not leave the fleet degraded for the next one for long.
        "CORRAL_DEGRADATION_HOLD": "2",
        # The fleet registry of this session, not the checkout's .corral/corral.db.
        "CORRAL_DATABASE_URL": f"sqlite:///{SESSION_DIR / 'corral.db'}",
    }
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A test run stopped with SIGTERM (a CI timeout, ``kill``) still runs its finalizers, so
    the fleet processes it started are stopped by PID instead of being orphaned.

    The process's settings are read here, from the environment above: ``get_settings()`` is
    read once per process, and a test that sets ``CORRAL_CONFIG`` or ``CORRAL_SCHEDULES`` for
    its own ``Settings()`` must not be the first to read them (it was, once the fleet's tests
    ahead of it had failed, and every later test saw its schedules)."""
    from app.settings import get_settings

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    get_settings()


_LOAD_REPORT: dict[str, object] = {}


@pytest.fixture(scope="session")
def load_report() -> dict[str, object]:
    """Figures the load tests measured, printed at the end of the run."""
    return _LOAD_REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LOAD_REPORT:
        terminalreporter.section("load figures")
        for name, figures in _LOAD_REPORT.items():
            terminalreporter.write_line(f"{name}: {figures}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart shared services run last, so nothing else runs in their wake."""
    items.sort(key=lambda item: item.get_closest_marker("chaos") is not None)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """Three simulated instances of parallelism 2, their workers, and the three routers."""
    from app.ops.backing_services import ensure_services

    problems = ensure_services()
    assert not problems, problems
    workdir: Path = tmp_path_factory.mktemp("fleet")
    # CORRAL_TEST_LOGLEVEL=INFO logs every job stage, to follow one that went astray.
    loglevel = os.environ.get("CORRAL_TEST_LOGLEVEL", "WARNING")
    stack = LocalFleet(workdir, dict(os.environ), SIMS, loglevel=loglevel)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        stack.purge()
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture
def healthy_fleet(fleet: LocalFleet) -> Iterator[LocalFleet]:
    """The shared fleet with every fault cleared and counters reset, before and after.

    It is handed on idle: a test whose jobs still hold slots or wait for one after it is
    waited for (bounded), and fails if they do not finish, rather than the next test.
    """
    fleet.clear_faults()
    fleet.reset_sims()
    _close_breakers(fleet)
    _expect_no_slots_held(fleet)
    yield fleet
    fleet.clear_faults()
    _expect_no_slots_held(fleet)


@pytest.fixture
def expect_idle() -> Callable[..., None]:
    """``expect_idle(fleet, timeout)``: fail unless no slot is held and no job waits."""
    return _expect_no_slots_held


def _expect_no_slots_held(fleet: LocalFleet, timeout: float = 20.0) -> None:
    """An earlier test's jobs may still be finishing; a slot held or a waiter left past that
    is a leak (a waiter nobody serves would be handed this test's freed slots), so say so
    here instead of letting this test wait for a slot that never comes."""
    from app.state.fleet import fleet_state

    deadline = time.monotonic() + timeout
    while not fleet.idle() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not fleet.idle():
        state = fleet_state()
        grants = state.slots.grants()
        pytest.fail(
            f"after {timeout:.0f} s, slots still held: {fleet.slots_held()} (grants: {grants}); "
            f"jobs still waiting for a slot: {fleet.waiters()}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    """A failing test that used the fleet shows the end of each fleet process's log."""
    report = yield
    fleet = getattr(item, "funcargs", {}).get("fleet") or getattr(item, "funcargs", {}).get(
        "healthy_fleet"
    )
    if report.failed and isinstance(fleet, LocalFleet):
        report.sections.append(("fleet state at failure", _fleet_state_dump()))
        if stacks := _stacks_of_workers_holding_slots(fleet):
            report.sections.append(("threads of the workers still holding slots", stacks))
        gateway = getattr(item, "funcargs", {}).get("gateway")
        if gateway is not None and (held := _gateway_lines_of_held_jobs(gateway.log_text())):
            report.sections.append(("the gateway's log lines of jobs holding slots", held))
        for log in sorted(fleet.workdir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-40:]
            report.sections.append((f"fleet log {log.name} (last 40 lines)", "\n".join(tail)))
    return report


def _fleet_state_dump() -> str:
    """The namespace's queues (ready / unacked / consumers) and slot bookkeeping in Redis."""
    import requests

    from app.state.fleet import fleet_state

    lines = []
    try:
        queues = requests.get(
            "http://127.0.0.1:15672/api/queues/%2F", auth=("guest", "guest"), timeout=5
        ).json()
        for q in queues:
            if q["name"].startswith(NAMESPACE + "."):
                lines.append(
                    f"queue {q['name']}: ready {q.get('messages_ready')}, unacked"
                    f" {q.get('messages_unacknowledged')}, consumers {q.get('consumers')}"
                )
    except (requests.RequestException, ValueError) as exc:
        lines.append(f"queues: management API unavailable ({exc})")
    state = fleet_state()
    for name, key in (
        ("grants", keys.grants(state.ns)),
        ("running", keys.running(state.ns)),
        ("excl", keys.excluded(state.ns)),
    ):
        lines.append(f"{name}: {state.redis.hgetall(key)}")
    for key in state.redis.scan_iter(keys.waiters(state.ns, "*")):
        lines.append(f"{key}: {state.redis.zrange(key, 0, -1, withscores=True)}")
    for name in state.instances.instance_names():
        lines.append(f"instance {name}: {state.redis.hgetall(keys.instance(state.ns, name))}")
    return "\n".join(lines)


def _stacks_of_workers_holding_slots(fleet: LocalFleet) -> str:
    """Where each thread of a worker that still holds a slot is (``py-spy dump``): a slot
    held past its job's length is a thread stuck somewhere, and this says where."""
    dumps = []
    for name, held in fleet.slots_held().items():
        child = fleet.procs.get(f"worker-{name}")
        if child is None or child.proc is None:
            continue
        try:
            dump = subprocess.run(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "dump",
                    "--pid",
                    str(child.proc.pid),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            stacks = dump.stdout + dump.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            stacks = f"py-spy dump failed: {exc}"
        dumps.append(f"worker-{name} (pid {child.proc.pid}, {held} slot(s) held):\n{stacks}")
    return "\n".join(dumps)


def _gateway_lines_of_held_jobs(log: str) -> str:
    from app.state.fleet import fleet_state

    held = fleet_state().slots.grants()
    return "\n".join(line for line in log.splitlines() if any(job in line for job in held))


def _close_breakers(fleet: LocalFleet) -> None:
    """Forget earlier tests' failures: every breaker closed, no error counts."""
    from app.state.fleet import fleet_state

    state = fleet_state()
    state.redis.hdel(keys.degradation(state.ns), "override")  # a pinned level, if a test died
    for name in fleet.sim_urls:
        state.redis.hset(
            keys.instance(state.ns, name),
            mapping={
                "breaker": "closed",
                "consecutive": 0,
                "errors": 0,
                "down_until": 0,
            },
        )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium driven by Selenium, with Debian's ``chromium`` and ``chromedriver``
    (never a downloaded driver). chromedriver and every browser process it started are
    stopped by PID at the end of the module."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import WebDriverException

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/bootstrap.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1440,1100",
    ):
        options.add_argument(flag)
    log = tmp_path_factory.mktemp("chromium") / "chromedriver.log"
    service = webdriver.ChromeService(executable_path=chromedriver, log_output=str(log))
    driver = webdriver.Chrome(options=options, service=service)
    driver_process = psutil.Process(service.process.pid)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield driver
    finally:
        # quit() ends the session (the browser) and chromedriver; whatever survives it, by PID.
        survivors = [*driver_process.children(recursive=True), driver_process]
        with contextlib.suppress(WebDriverException):
            driver.quit()
        for process in survivors:
            if process.is_running():
                process.kill()
        psutil.wait_procs(survivors, timeout=10)


PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL schema of this session's own on the machine's server, dropped after."""
    import sqlalchemy as sa

    schema = f"corral_{os.getpid()}"
    server = sa.create_engine(PG_SERVER)
    with server.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        # libpq's options: every connection of this URL works in that schema.
        yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    finally:
        with server.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        server.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind Corral supports."""
    import sqlalchemy as sa

    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/corral.db"  # the directory does not exist yet
    url = request.getfixturevalue("pg_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        tables = "instances, api_keys, agent_classes, global_limits, alembic_version"
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {tables}"))
    engine.dispose()
    return url
