"""``corral up``: start every process of a stack, supervise them, stop them all on Ctrl-C."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from app.settings import TIERS, InstanceConfig, get_settings

LOG_DIR = Path(".corral/logs")
#: Absolute, so `corral up` works from any directory of a source checkout.
#: Ollama's own port: clients reach the gateway with no change but OLLAMA_HOST.
GATEWAY_PORT = 11434
FLOWER_CONFIG = Path(__file__).resolve().parents[2] / "flower" / "flowerconfig.py"
#: The demo's simulated Ollama servers listen here and on the next two ports.
DEMO_SIM_PORT = 11501


@dataclass
class Child:
    """One supervised process; restarted if it dies on its own."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path = LOG_DIR
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        with self.log.open("ab") as out:
            # A session of its own: Ctrl-C reaches only the supervisor, which stops children
            # in order instead of all at once.
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the child's whole process group (it leads its own session)."""
        if self.proc is not None and self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)


def _corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def plan(instances: list[InstanceConfig], env: dict[str, str], flower: bool) -> list[Child]:
    children = [
        Child(f"worker-{i.name}", _corral("worker", "--instance", i.name), env) for i in instances
    ]
    children += [Child(f"router-{t}", _corral("router", "--tier", t), env) for t in TIERS]
    children.append(Child("metrics", _corral("metrics"), env))
    if get_settings().schedules:
        children.append(Child("beat", _corral("beat"), env))
    children.append(
        Child("gateway", _corral("gateway", "--port", str(GATEWAY_PORT), "--no-access-log"), env)
    )
    if flower:
        children.append(
            Child(
                "flower",
                # Corral's queues listed in the Broker tab from the start: see app.ops.flower.
                _corral("flower", f"--conf={FLOWER_CONFIG}"),
                env,
            )
        )
    return children


def _wait_ready(instances: list[InstanceConfig], timeout: float = 90.0) -> bool:
    from app.state.fleet import fleet_state

    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = fleet_state().instances.snapshot()
        up = {i.name for i in snap.instances if i.up(snap.now) and i.models}
        if all(i.name in up for i in instances):
            return True
        time.sleep(0.5)
    return False


def run_stack(*, demo_jobs: int, flower: bool, stay: bool) -> int:
    from app.ops.backing_services import ensure_services

    problems = ensure_services()
    if problems:
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        return 2
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    env = dict(os.environ)
    children: list[Child] = []
    sim_urls: list[str] = []
    instances = settings.instances
    if not instances:
        from app.simulator.fleet import default_demo_fleet

        sims = default_demo_fleet(DEMO_SIM_PORT)
        instances = [
            InstanceConfig(name=s.name, url=f"http://{s.host}:{s.port}", parallelism=s.num_parallel)
            for s in sims
        ]
        sim_urls = [i.url for i in instances]
        # This process (the demo) and every child see the simulated fleet.
        os.environ["CORRAL_INSTANCES"] = env["CORRAL_INSTANCES"] = json.dumps(
            [i.model_dump() for i in instances]
        )
        get_settings.cache_clear()
        children.append(Child("sim", _corral("sim", "--base-port", str(DEMO_SIM_PORT)), env))
    if sim_urls and "CORRAL_GATEWAY_AUTH" not in env:
        # The simulated demo is local and throwaway: no key to create before the first call.
        env["CORRAL_GATEWAY_AUTH"] = "false"
    if flower and "FLOWER_BASIC_AUTH" not in env:
        env["FLOWER_BASIC_AUTH"] = f"corral:{secrets.token_urlsafe(9)}"
    children += plan(instances, env, flower)

    def stop_all(*_: object) -> None:
        # A second Ctrl-C (or SIGTERM) while stopping would abandon the children not yet
        # stopped; each is stopped with a bounded wait anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        typer.echo("\nstopping...")
        for child in reversed(children):
            child.stop()
        typer.echo("all processes stopped")

    # SIGTERM (docker stop, systemd, kill) stops the children as Ctrl-C does, instead of
    # orphaning them.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for child in children:
            child.start()
            if child.name == "sim":
                time.sleep(1.0)
        typer.echo(f"started {len(children)} processes; logs in {LOG_DIR}/")
        if not _wait_ready(instances):
            typer.echo(f"error: instance workers did not come up; see {LOG_DIR}/", err=True)
            return 1
        _print_howto(flower, env.get("FLOWER_BASIC_AUTH", ""), env.get("CORRAL_GATEWAY_AUTH"))
        if demo_jobs:
            from app.bench.demo import run_demo

            run_demo(demo_jobs, sim_urls=sim_urls)
        while stay:
            for child in children:
                if not child.alive():
                    child.restarts += 1
                    typer.echo(f"{child.name} exited; restarting (#{child.restarts})")
                    child.start()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop_all()
    return 0


def _print_howto(flower: bool, flower_auth: str, gateway_auth: str | None) -> None:
    typer.echo("\nCorral is up. Submit a job from Python:")
    typer.echo("    from tasks import infer")
    typer.echo(
        '    infer.delay(model="llama3.2:3b", prompt="Why is the sky blue?",'
        ' tier="interactive").get(timeout=60)'
    )
    typer.echo("or from the shell:  .venv/bin/corral submit --model llama3.2:3b --prompt hi")
    keys = "no key needed" if gateway_auth == "false" else "create a key: corral keys add"
    typer.echo(
        f"Ollama/OpenAI gateway: http://127.0.0.1:{GATEWAY_PORT}  ({keys}); e.g.\n"
        f"    OLLAMA_HOST=http://127.0.0.1:{GATEWAY_PORT} .venv/bin/python examples/chat.py"
    )
    if flower:
        typer.echo(f"Flower: http://127.0.0.1:5555  (basic auth {flower_auth})")
    s = get_settings()
    typer.echo(f"Prometheus metrics: http://{s.metrics_host}:{s.metrics_port}/metrics")
    typer.echo("Ctrl-C stops every process started here.\n")
