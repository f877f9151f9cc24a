"""``corral fleet``: look at the fleet and change it live.

Every change goes to the registry (``CORRAL_DATABASE_URL``) and into Redis at once (see
``app.fleet.admin``); nothing needs a restart, except a parallelism raised above what a
running worker was started with (the output says so).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from app.settings import get_settings
from routing.capacity import GIB

if TYPE_CHECKING:
    from app.fleet.admin import Applied, FleetAdmin, InstanceView
    from routing import InstanceStats

#: FleetAdmin or PolicyAdmin: what ``corral fleet`` and ``corral policy`` change things with.
Admin = TypeVar("Admin")

fleet_cli = typer.Typer(help="Look at and change the fleet; changes apply live.")

Url = Annotated[str | None, typer.Option(help="base URL, e.g. http://gpu-1:11434")]
Parallelism = Annotated[
    int | None, typer.Option(help="OLLAMA_NUM_PARALLEL of the server (default 2)")
]
MaxLoaded = Annotated[
    int | None,
    typer.Option(help="OLLAMA_MAX_LOADED_MODELS: models the server holds at once (default 3)"),
]
MemoryGb = Annotated[
    float | None,
    typer.Option(
        min=0,
        help="GiB the server gives models (VRAM; RAM on a CPU box): loaded models' sizes fit"
        " in it (default: none, max-loaded-models alone; 0 clears it)",
    ),
]
Weight = Annotated[float | None, typer.Option(help="share of the work (default 1.0)")]
Role = Annotated[str | None, typer.Option(help="chat, embedding or both (default)")]
Priority = Annotated[int | None, typer.Option(help="priority level 0-9, 9 first (default 5)")]
RequestTimeout = Annotated[
    float | None, typer.Option(help="longest silence from the server, seconds")
]
RetryAttempts = Annotated[
    int | None, typer.Option(help="attempts in all of a job failing on it (default: max_attempts)")
]
RateLimit = Annotated[int | None, typer.Option(help="jobs it starts per minute at most")]
Tags = Annotated[str | None, typer.Option(help="comma-separated, e.g. gpu,a100 ('' clears)")]
Models = Annotated[
    list[str] | None,
    typer.Option("--model", help="serve only these (repeatable); default: its /api/tags"),
]


def no_registry(exc: Exception) -> typer.Exit:
    """Say that the registry's database cannot be opened; raise what this returns."""
    from app.db import shown_url

    url = shown_url(get_settings().database_url)
    typer.echo(f"error: cannot open the registry at {url} (CORRAL_DATABASE_URL): {exc}", err=True)
    return typer.Exit(1)


def opened(ready: Callable[[], Admin]) -> Admin:
    """``ready()``, an admin over the registry; or exit 1 saying the registry cannot be opened."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return ready()
    except SQLAlchemyError as exc:
        raise no_registry(exc) from None


def _admin() -> FleetAdmin:
    from app.fleet.admin import FleetAdmin

    return opened(FleetAdmin.ready)


@contextmanager
def _refused() -> Iterator[None]:
    """A change the registry or the fleet refuses: its message, exit status 1."""
    from app.fleet.admin import FleetConflict
    from app.fleet.registry import UnknownInstance

    try:
        yield
    except (UnknownInstance, FleetConflict, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _fields(tags: str | None, models: list[str] | None, **options: Any) -> dict[str, Any]:
    """The options given on the command line, as registry fields; ``--memory-gb 0`` is none."""
    fields = {k: v for k, v in options.items() if v is not None}
    if fields.get("memory_gb") == 0:
        fields["memory_gb"] = None
    if tags is not None:
        fields["tags"] = [t.strip() for t in tags.split(",") if t.strip()]
    if models:
        fields["models"] = models
    return fields


def _echo_applied(done: str, applied: Applied) -> None:
    c = applied.config
    typer.echo(
        f"{done} {c.name}: {c.url}, parallelism {c.parallelism}, weight {c.weight}, role {c.role},"
        f" priority {c.priority}, {'taking jobs' if c.enabled else 'draining'}"
    )
    if applied.note:
        typer.echo(f"note: {applied.note}")


def _line(v: InstanceView) -> str:
    c, i = v.config, v.live
    if i is None:
        assert c is not None
        return f"{v.name:12} {v.state:9} {c.url}  parallelism {c.parallelism}"
    host = f"cpu {i.host_cpu:3.0f}%  mem {i.host_mem:3.0f}%  probe {i.probe_ms:5.1f} ms"
    return (
        f"{v.name:12} {v.state:9} {i.in_flight}/{i.capacity} in flight  {host}  "
        f"ewma {i.ewma_ms:7.1f} ms  breaker {i.breaker}  "
        f"loaded {sorted(i.loaded)} ({_holds(i)})  "
        f"serves {sorted(i.models)}" + ("" if c else "  (not in the registry)")
    )


def _holds(i: InstanceStats) -> str:
    """What the server holds at once; with a memory budget, the GiB the loaded models take
    of it, and each one's."""
    if i.memory is None:
        return f"holds {i.max_loaded}"
    sizes = {m: i.sizes.get(m, 0.0) / GIB for m in sorted(i.loaded)}
    each = ", ".join(f"{m} {gib:.1f}" for m, gib in sizes.items())
    return f"holds {i.max_loaded}, {sum(sizes.values()):.1f} of {i.memory / GIB:.1f} GiB" + (
        f": {each}" if each else ""
    )


@fleet_cli.command("list")
def fleet_list() -> None:
    """Every instance: live state, slots, its host's CPU and memory, models."""
    from app.state.fleet import fleet_state

    snap = fleet_state().instances.snapshot()
    typer.echo(
        f"strategy: {snap.strategy_for('*', get_settings().strategy)} "
        f"(overrides: {snap.strategies or 'none'})"
    )
    for view in _admin().views():
        typer.echo(_line(view))
    plan = fleet_state().placement.read()
    if plan:
        typer.echo(
            "placement plan (models each instance should hold): "
            + "; ".join(f"{name} {models}" for name, models in sorted(plan.items()))
        )


@fleet_cli.command("show")
def fleet_show(name: str) -> None:
    """One instance: its registry row, its live state and its raw Redis hash, as JSON."""
    admin = _admin()
    with _refused():
        view = admin.view(name)
    raw = admin.fleet.instances.row(name)
    typer.echo(json.dumps(view.as_dict() | {"redis": raw}, indent=2, sort_keys=True))


@fleet_cli.command("add")
def fleet_add(
    name: str,
    url: Annotated[str, typer.Option(help="base URL, e.g. http://gpu-1:11434")],
    parallelism: Parallelism = None,
    max_loaded_models: MaxLoaded = None,
    memory_gb: MemoryGb = None,
    weight: Weight = None,
    role: Role = None,
    priority: Priority = None,
    request_timeout: RequestTimeout = None,
    retry_attempts: RetryAttempts = None,
    rate_limit: RateLimit = None,
    tags: Tags = None,
    model: Models = None,
    drained: Annotated[bool, typer.Option(help="add it draining (no jobs yet)")] = False,
) -> None:
    """Add an instance; it gets jobs once its worker runs (corral worker --instance NAME)."""
    from app.settings import InstanceConfig

    fields = _fields(
        tags,
        model,
        url=url,
        parallelism=parallelism,
        max_loaded_models=max_loaded_models,
        memory_gb=memory_gb,
        weight=weight,
        role=role,
        priority=priority,
        request_timeout=request_timeout,
        retry_attempts=retry_attempts,
        rate_limit_per_minute=rate_limit,
    )
    admin = _admin()
    with _refused():
        applied = admin.add(InstanceConfig(name=name, enabled=not drained, **fields))
    _echo_applied("added", applied)
    typer.echo(f"start its worker where it can reach {url}: corral worker --instance {name}")


@fleet_cli.command("update")
def fleet_update(
    name: str,
    url: Url = None,
    parallelism: Parallelism = None,
    max_loaded_models: MaxLoaded = None,
    memory_gb: MemoryGb = None,
    weight: Weight = None,
    role: Role = None,
    priority: Priority = None,
    request_timeout: RequestTimeout = None,
    retry_attempts: RetryAttempts = None,
    rate_limit: RateLimit = None,
    tags: Tags = None,
    model: Models = None,
    discover_models: Annotated[
        bool, typer.Option(help="forget --model: serve what its /api/tags lists")
    ] = False,
) -> None:
    """Change an instance's configuration; only the options given change."""
    fields = _fields(
        tags,
        model,
        url=url,
        parallelism=parallelism,
        max_loaded_models=max_loaded_models,
        memory_gb=memory_gb,
        weight=weight,
        role=role,
        priority=priority,
        request_timeout=request_timeout,
        retry_attempts=retry_attempts,
        rate_limit_per_minute=rate_limit,
    )
    if discover_models:
        fields["models"] = None
    if not fields:
        raise typer.BadParameter("give at least one option to change; see --help")
    admin = _admin()
    with _refused():
        applied = admin.update(name, **fields)
    _echo_applied("updated", applied)


@fleet_cli.command("remove")
def fleet_remove(
    name: str,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for its jobs to finish (it drains first)")
    ] = 0.0,
    force: Annotated[
        bool, typer.Option(help="remove it even with jobs in flight (they still finish)")
    ] = False,
) -> None:
    """Remove an instance: it drains, and is refused while jobs are in flight unless --force."""
    admin = _admin()
    with _refused():
        moved = admin.remove(name, wait=wait, force=force)
    requeued = f"; {moved} queued job(s) sent back to the router" if moved else ""
    typer.echo(f"removed {name}{requeued}")
    typer.echo("its worker, if one runs, gets no new jobs: stop it")


@fleet_cli.command("drain")
def fleet_drain(name: str) -> None:
    """Send the instance no new jobs; running ones finish."""
    admin = _admin()
    with _refused():
        admin.set_enabled(name, False)
    typer.echo(f"{name} draining")


@fleet_cli.command("undrain")
def fleet_undrain(name: str) -> None:
    """Send the instance jobs again."""
    admin = _admin()
    with _refused():
        admin.set_enabled(name, True)
    typer.echo(f"{name} taking jobs")


@fleet_cli.command("strategy")
def fleet_strategy(
    strategy: Annotated[str | None, typer.Argument(help="omit to reset to the setting")] = None,
    model: Annotated[str, typer.Option(help="only for this model")] = "*",
) -> None:
    """Change the routing strategy live, for every model or one."""
    from app.settings import normalize_model
    from app.state.fleet import fleet_state
    from routing import STRATEGIES

    if strategy is not None and strategy not in STRATEGIES:
        raise typer.BadParameter(f"strategy must be one of {', '.join(STRATEGIES)}")
    fleet_state().instances.set_strategy(
        strategy, model if model == "*" else normalize_model(model)
    )
    typer.echo(f"strategy for {model}: {strategy or 'the configured default'}")
