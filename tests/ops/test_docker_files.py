"""docker/compose.yaml and docker/Dockerfile, checked without a Docker engine.

Every command is parsed by the real CLI (Corral's Typer app, Celery's and Flower's), every
CORRAL_* variable is validated by the real settings object, and the health-check script is
run against the test fleet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.core import TyperGroup

from app.bench.harness import LocalFleet
from app.cli import cli
from app.settings import TIERS, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
#: The services that run Corral's image (the others are RabbitMQ, Redis, PostgreSQL, Ollama).
CORRAL = {name: s for name, s in SERVICES.items() if "build" in s}
WORKDIR = "/app"


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` and ``${VAR:?error}``, as if VAR were unset but required."""

    def one(m: re.Match[str]) -> str:
        op, arg = m.group(2) or "", m.group(3) or ""
        return arg if op.endswith("-") else "user:secret"

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container of this service reads: only its own environment."""
    for key in list(os.environ):
        if key.startswith("CORRAL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CORRAL_CONFIG", "/nonexistent/corral.toml")
    for key, value in environment(service).items():
        monkeypatch.setenv(key, value)
    return Settings()


def parse_corral(argv: list[str]) -> Any:
    """Resolve ``corral ...`` to its command and parse its options (types, required).

    Returns the command's context (Typer ships its own copy of click, hence no click types).
    """
    assert argv[0] == "corral", argv
    command = typer.main.get_command(cli)
    name, args, parent = "corral", argv[1:], None
    while isinstance(command, TyperGroup):
        parent = command.context_class(command, info_name=name, parent=parent)
        assert args, f"{argv}: a subcommand is missing"
        name, *args = args
        sub = command.get_command(parent, name)
        assert sub is not None, f"{argv}: corral has no command {name!r}"
        command = sub
    return command.make_context(name, args, parent=parent)


def check_flower_options(args: list[str]) -> None:
    """Each ``--opt=value`` of ``corral flower`` is one of Flower's options."""
    from flower.options import options

    for arg in args:
        name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        assert name in options, f"Flower has no option {name!r}"


def commands() -> dict[str, list[str]]:
    return {name: s["command"] for name, s in CORRAL.items()}


def by_command(word: str) -> dict[str, Any]:
    return {
        name: parse_corral(argv)
        for name, argv in commands().items()
        if argv[:2] == ["corral", word]
    }


@pytest.mark.parametrize("service", sorted(CORRAL))
def test_every_corral_service_runs_a_real_command(service: str) -> None:
    argv = CORRAL[service]["command"]
    assert isinstance(argv, list), "exec form: no shell between Docker's signals and the process"
    ctx = parse_corral(argv)
    if argv[:2] == ["corral", "flower"]:
        check_flower_options(ctx.args)


def test_the_stack_has_every_process_of_a_local_run() -> None:
    assert "management" in SERVICES["rabbitmq"]["image"]
    assert SERVICES["redis"]["image"].startswith("redis")
    assert SERVICES["postgres"]["image"].startswith("postgres")
    routers = by_command("router")
    assert sorted(ctx.params["tier"] for ctx in routers.values()) == sorted(TIERS)
    gateways = by_command("gateway")
    assert [(c.params["host"], c.params["port"]) for c in gateways.values()] == [("0.0.0.0", 11434)]
    assert len(by_command("metrics")) == 1
    assert [n for n, argv in commands().items() if "flower" in argv] == ["flower"]


def test_one_worker_per_configured_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = by_command("worker")
    for name, ctx in workers.items():
        settings = settings_of(CORRAL[name], monkeypatch)
        settings.instance(ctx.params["instance"])  # raises if the instance is not configured
    settings = settings_of(next(iter(CORRAL.values())), monkeypatch)
    assert sorted(c.params["instance"] for c in workers.values()) == sorted(
        i.name for i in settings.instances
    )
    # Instances served by an Ollama container of this file have one, with the same parallelism.
    for inst in settings.instances:
        host = inst.url.split("://")[1].split(":")[0]
        if host in SERVICES:
            ollama_env = SERVICES[host]["environment"]
            assert int(ollama_env["OLLAMA_NUM_PARALLEL"]) == inst.parallelism


@pytest.mark.parametrize("service", sorted(CORRAL))
def test_corral_env_vars_are_settings_fields(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(CORRAL[service])
    corral_vars = {k for k in env if k.startswith("CORRAL_")}
    assert corral_vars, "a Corral container needs its settings"
    for key in corral_vars:
        field = key.removeprefix("CORRAL_").split("__")[0].lower()
        assert field in Settings.model_fields, f"{key}: Settings has no field {field!r}"
    settings = settings_of(CORRAL[service], monkeypatch)  # validates every value
    assert settings.broker_url.startswith("amqp://") and "@rabbitmq:" in settings.broker_url
    assert "redis:6379" in settings.redis_url and "redis:6379" in settings.result_backend


def test_every_service_has_a_health_check() -> None:
    for name, service in SERVICES.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        if "docker/healthcheck.py" not in test:
            continue
        kind, target = test[-2:]
        argv = service["command"]
        if kind == "worker":
            assert parse_corral(argv).params["instance"] == target
        elif kind == "router":
            assert parse_corral(argv).params["tier"] == target
        else:
            assert kind == "http"
            port = target.split(":")[2].split("/")[0]
            assert port in " ".join(argv) or environment(service).get("FLOWER_PORT") == port


def test_images_are_built_from_the_dockerfile() -> None:
    for name, service in CORRAL.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).is_file(), name


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_installs_the_project_and_runs_corral() -> None:
    steps = dockerfile()
    base = next(arg for op, arg in steps if op == "FROM")
    major, minor = map(int, re.match(r"python:(\d+)\.(\d+)", base).groups())
    assert (major, minor) >= (3, 11)
    assert ("WORKDIR", WORKDIR) in steps
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    copied = {arg.split()[0] for op, arg in steps if op == "COPY"}
    assert {"pyproject.toml", "app", "tasks", "routing", "flower"} <= copied
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert any(re.search(r"pip install (-e )?\.(\s|$)", arg) for arg in installs), installs
    command = next(json.loads(arg) for op, arg in steps if op in ("CMD", "ENTRYPOINT"))
    assert command[0] == "corral"
    # Flower's --conf in compose is the file the image copied from the repository.
    conf = next(a for a in SERVICES["flower"]["command"] if a.startswith("--conf="))
    in_repo = Path(conf.removeprefix("--conf=")).relative_to(WORKDIR)
    assert (ROOT / in_repo).is_file()


@pytest.mark.fleet
def test_healthcheck_script_pings_the_real_workers(healthy_fleet: LocalFleet) -> None:
    def check(*args: str) -> int:
        script = str(DOCKER / "healthcheck.py")
        run = subprocess.run(
            [sys.executable, script, *args], cwd=ROOT, env=dict(os.environ), timeout=60
        )
        return run.returncode

    assert check("worker", "sim-a") == 0
    assert check("router", "interactive") == 0
    assert check("worker", "no-such-instance") == 1
    assert check("http", healthy_fleet.sim_urls["sim-b"] + "/api/version") == 0
    assert check("http", "http://127.0.0.1:9/") == 1
