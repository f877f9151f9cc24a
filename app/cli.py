"""``corral``: run the pieces of a Corral stack, or the whole stack at once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from app.fleet.cli import fleet_cli, fleet_list, no_registry
from app.fleet.policy_cli import policy_cli
from app.settings import TIERS, get_settings

cli = typer.Typer(
    help="Corral: a fleet of Ollama servers behind Celery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _celery_worker(
    *,
    config: dict[str, Any],
    queues: list[str],
    node: str,
    loglevel: str,
    role: str,
    steps: tuple[type, ...] = (),
) -> None:
    """``celery worker`` with the role's configuration (``app.celery_app``), on ``queues``,
    with the consumer's bootsteps ``steps`` added."""
    from app.celery_app import celery_app, use_role_config
    from app.jobs.consumer_watch import ConsumerWatch
    from app.observe import logs, tracing

    logs.set_role(role)
    tracing.setup(role)
    use_role_config(config)
    for step in (ConsumerWatch, *steps):
        celery_app.steps["consumer"].add(step)
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            ",".join(queues),
            "-n",
            node,
            "--loglevel",
            loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
    )


@cli.command()
def worker(
    instance: Annotated[str | None, typer.Option(help="instance name in the registry")] = None,
    ollama: Annotated[str | None, typer.Option(help="register this Ollama URL itself")] = None,
    name: Annotated[str | None, typer.Option(help="name for --ollama (default: host:port)")] = None,
    parallelism: Annotated[
        int | None, typer.Option(help="OLLAMA_NUM_PARALLEL, with --ollama (default 2)")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="with --ollama: serve only these (default: /api/tags)")
    ] = None,
    loglevel: str = "INFO",
) -> None:
    """Run the worker of one Ollama instance (-c = its parallelism, prefetch 1).

    With --ollama, the instance is added to the registry (or its row updated) first.
    """
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from app.celery_app import instance_worker_config
    from app.fleet.registry import Registry
    from app.jobs import instance_worker
    from app.queues import instance_queue

    if not (instance or ollama):
        raise typer.BadParameter("give --instance NAME or --ollama URL")
    try:
        registry = Registry.ready()
        if instance:
            config = registry.get(instance)
        else:
            assert ollama is not None
            name = name or ollama.split("://")[-1].replace(":", "-").replace("/", "")
            given = {"url": ollama, "parallelism": parallelism, "models": model or None}
            config = registry.upsert(name, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    except SQLAlchemyError as exc:
        raise no_registry(exc) from None
    if config is None:
        raise typer.BadParameter(
            f"no instance {instance!r} in the registry or the fleet file; add it with"
            f" `corral fleet add {instance} --url URL`, or use --ollama URL"
        )
    instance_worker.configure(config, registry)
    settings = get_settings()
    ns = settings.namespace
    # One worker per instance: a second one for the same instance fails to start (its
    # node name, and so its control queue, is taken).
    _celery_worker(
        config=instance_worker_config(settings, config.parallelism),
        queues=[instance_queue(config.name)],
        node=f"{ns}.{config.name}@%h",
        loglevel=loglevel,
        role=f"worker-{config.name}",
    )


@cli.command()
def router(
    tier: Annotated[str, typer.Option(help="interactive, normal or batch")],
    concurrency: Annotated[int | None, typer.Option(help="router threads")] = None,
    loglevel: str = "INFO",
    wait: Annotated[float, typer.Option(help="seconds to wait for a first model")] = 120.0,
) -> None:
    """Run the router of one tier: it moves jobs from model/tier queues to instances."""
    from app.celery_app import router_config
    from app.jobs import router_worker

    if tier not in TIERS:
        raise typer.BadParameter(f"tier must be one of {', '.join(TIERS)}")
    deadline = time.time() + wait
    while not (queues := router_worker.configure(tier)):
        if time.time() > deadline:
            typer.echo("no instance has registered a model; start an instance worker", err=True)
            raise typer.Exit(1)
        time.sleep(0.5)
    settings = get_settings()
    ns = settings.namespace
    _celery_worker(
        config=router_config(settings, concurrency or settings.router_concurrency),
        queues=queues,
        node=f"{ns}.router-{tier}.{os.getpid()}@%h",
        loglevel=loglevel,
        role=f"router-{tier}",
        steps=(router_worker.PrefetchPerModel,),
    )


@cli.command()
def beat(
    schedule_file: Annotated[
        Path, typer.Option(help="where beat keeps each schedule's last run")
    ] = Path(".corral/celerybeat-schedule"),
    loglevel: str = "INFO",
) -> None:
    """Run celery beat, one per fleet: it submits the `schedules` batch jobs when due."""
    from app.celery_app import beat_config, celery_app, use_role_config
    from app.observe import logs, tracing

    logs.set_role("beat")
    tracing.setup("beat")

    schedules = get_settings().schedules
    if not schedules:
        typer.echo("no schedules configured: add [[schedules]] to corral.toml", err=True)
        raise typer.Exit(1)
    for s in schedules:
        typer.echo(f"{s.name}: {s.job} {f'every {s.every:g} s' if s.every else f'cron {s.cron}'}")
    schedule_file.parent.mkdir(parents=True, exist_ok=True)
    use_role_config(beat_config(get_settings()))
    celery_app.start(["beat", "--schedule", str(schedule_file), "--loglevel", loglevel])


@cli.command()
def degrade(
    level: Annotated[
        int | None, typer.Option(min=0, max=3, help="hold the fleet at this level")
    ] = None,
    auto: Annotated[bool, typer.Option(help="give the level back to the signals")] = False,
) -> None:
    """Show the degradation level, pin it (--level N), or release it (--auto)."""
    from app.policy.degradation import NAMES, degradation

    state = degradation()
    if level is not None or auto:
        state.pin(None if auto else level)
    now = state.stored()
    current = state.level(fresh=True)
    pinned = " (pinned; --auto releases it)" if "override" in now else ""
    typer.echo(f"degradation level {current}: {NAMES[current]}{pinned}")
    typer.echo(f"signals: {now.get('reason', 'not evaluated yet (no router running?)')}")


@cli.command()
def sim(
    fleet: Annotated[Path | None, typer.Option(help="simulator fleet TOML")] = None,
    base_port: Annotated[int, typer.Option(help="first port of the demo fleet")] = 11501,
) -> None:
    """Run simulated Ollama servers (the demo fleet of 3 unless --fleet is given)."""
    from app.simulator import run_fleet
    from app.simulator.fleet import default_demo_fleet, load_fleet_file

    instances = load_fleet_file(fleet) if fleet else default_demo_fleet(base_port)
    for inst in instances:
        typer.echo(f"simulated Ollama {inst.name} on http://{inst.host}:{inst.port}")
    run_fleet(instances)


@cli.command()
def submit(
    model: Annotated[str, typer.Option(help="e.g. llama3.2:3b")],
    prompt: Annotated[str | None, typer.Option(help="for generate")] = None,
    message: Annotated[str | None, typer.Option(help="for chat: one user message")] = None,
    embed: Annotated[list[str] | None, typer.Option(help="for embed; repeatable")] = None,
    tier: str = "interactive",
    priority: int = 5,
    agent: str | None = None,
    timeout: float = 120.0,
    no_wait: bool = False,
) -> None:
    """Submit one job and print its result as JSON."""
    from tasks import infer

    fields: dict[str, Any] = {"model": model, "tier": tier, "priority": priority, "agent": agent}
    if embed:
        fields |= {"kind": "embed", "input": embed}
    elif message:
        fields |= {"kind": "chat", "messages": [{"role": "user", "content": message}]}
    else:
        fields |= {"kind": "generate", "prompt": prompt}
    result = infer.delay(**{k: v for k, v in fields.items() if v is not None})
    if no_wait:
        typer.echo(result.id)
        return
    typer.echo(result.get(timeout=timeout).model_dump_json(indent=2))


cli.add_typer(fleet_cli, name="fleet")
cli.add_typer(policy_cli, name="policy")


dlq_cli = typer.Typer(help="Jobs that gave up, with their error history.")
cli.add_typer(dlq_cli, name="dlq")


@dlq_cli.command("list")
def dlq_list() -> None:
    """One line per dead job: id, error, attempts, model."""
    from app.ops.dead_letters import read_all

    records = read_all()
    for r in records:
        typer.echo(
            f"{r['job_id']}  {r['error']:16} attempts {r['attempts']}  "
            f"{r['request'].get('model')}  {r['message'][:80]}"
        )
    typer.echo(f"{len(records)} dead job(s)")


@dlq_cli.command("show")
def dlq_show(job_id: str) -> None:
    """A dead job's record: request, error and every attempt, as JSON."""
    from app.ops.dead_letters import read_all

    for r in read_all():
        if r["job_id"] == job_id:
            typer.echo(json.dumps(r, indent=2))
            return
    raise typer.BadParameter(f"no dead job {job_id!r}; see `corral dlq list`")


@dlq_cli.command("replay")
def dlq_replay(
    job_ids: Annotated[list[str] | None, typer.Argument(help="omit with --all")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead job")] = False,
) -> None:
    """Submit dead jobs again as new jobs; their records leave the queue."""
    from app.ops.dead_letters import replay

    for old, new in replay(_selected(job_ids, all_)):
        typer.echo(f"{old} -> {new}")


@dlq_cli.command("purge")
def dlq_purge(
    job_ids: Annotated[list[str] | None, typer.Argument(help="omit with --all")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead job")] = False,
) -> None:
    """Delete dead-job records."""
    from app.ops.dead_letters import purge

    typer.echo(f"purged {len(purge(_selected(job_ids, all_)))} record(s)")


def _selected(job_ids: list[str] | None, all_: bool) -> set[str] | None:
    """The job ids a dlq command acts on; None means every dead job."""
    if not job_ids and not all_:
        raise typer.BadParameter("name job ids, or pass --all")
    return None if all_ else set(job_ids or [])


@cli.command()
def status() -> None:
    """Print the fleet as the routers see it (same as `corral fleet list`)."""
    fleet_list()


@cli.command()
def up(
    demo_jobs: Annotated[int, typer.Option(help="jobs in the demo run (0 = no demo)")] = 120,
    flower: Annotated[bool, typer.Option(help="start Flower")] = True,
    exit_after_demo: Annotated[bool, typer.Option(help="stop after the demo")] = False,
) -> None:
    """Start the whole stack (simulated fleet unless one is configured), run a demo, serve."""
    from app.bench.stack import run_stack

    raise typer.Exit(run_stack(demo_jobs=demo_jobs, flower=flower, stay=not exit_after_demo))


@cli.command()
def bench(
    scenario: Annotated[
        str,
        typer.Option(
            help="overhead, submit, mixed, short, backlog, agents, burst, placement, embed or all"
        ),
    ] = "all",
    jobs: Annotated[int, typer.Option(help="jobs per throughput and mixed-fleet run")] = 500,
    backlog: Annotated[
        int | None,
        typer.Option(help="batch jobs queued at once (default: 500 in backlog, 1000 in agents)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="the JSON report (default: bench-results/<time>.json); plot beside it"),
    ] = None,
    plot_only: Annotated[
        Path | None, typer.Option(help="measure nothing: draw the plot of this saved report")
    ] = None,
    docs_plot: Annotated[
        bool, typer.Option(help="also copy the plot to docs/bench.png, which the README shows")
    ] = True,
) -> None:
    """Measure Corral against calling Ollama directly and against plain proxies; plot it."""
    from app.bench import fleet as bench_fleet
    from app.bench.agents import run_agents
    from app.bench.overhead import run_benchmark
    from app.bench.report import meta, publish  # imports matplotlib: fail before measuring

    report_file = plot_only
    if report_file is None:
        report = {"meta": meta(sys.argv[1:])}
        batch = {} if backlog is None else {"batch": backlog}
        if scenario in ("overhead", "all"):
            report["overhead"] = run_benchmark(jobs=jobs)
        if scenario == "submit":  # also part of overhead
            from app.bench.overhead import run_submission

            report["submit"] = run_submission()
        if scenario in ("mixed", "all"):
            typer.echo(f"\nmixed fleet, {jobs} jobs per run")
            report["mixed"] = bench_fleet.run_mixed(jobs)
        if scenario in ("short", "all"):
            from app.bench.short_jobs import run_short

            typer.echo("\nshort jobs on mixed fleets, fixed service times")
            report["short"] = run_short()
        if scenario in ("backlog", "all"):
            typer.echo("\ninteractive jobs behind a batch backlog")
            report["backlog"] = bench_fleet.run_backlog(**batch)
        if scenario in ("agents", "all"):
            typer.echo("\n131 agents of two classes, with limits and a bulkhead")
            report["agents"] = run_agents(**batch)
        if scenario in ("burst", "all"):
            from app.bench.burst import BURST_JOBS, run_burst

            typer.echo(f"\n{BURST_JOBS} jobs at once, interactive jobs meanwhile")
            report["burst"] = run_burst()
        if scenario in ("placement", "all"):
            from app.bench.placement import run_placement

            typer.echo("\nmore models than the boxes hold at once (placement, issue 16)")
            report["placement"] = run_placement()
        if scenario in ("embed", "all"):
            from app.bench.embed import run_embed

            typer.echo("\nbatched embeddings against one call per job (issue 14)")
            report["embed"] = run_embed(jobs)
        report_file = out or Path(f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}.json")
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=2))
        typer.echo(f"report written to {report_file}")
    png = publish(report_file, Path("docs/bench.png") if docs_plot else None)
    if png is not None:
        typer.echo(f"plot written to {png}" + (" and docs/bench.png" if docs_plot else ""))


@cli.command()
def metrics(
    port: Annotated[int | None, typer.Option(help="port (default: metrics_port, 9808)")] = None,
    host: Annotated[str | None, typer.Option(help="address (default: metrics_host)")] = None,
) -> None:
    """Serve Prometheus metrics of the whole fleet: queues, instances, jobs, cache."""
    from app.ops.metrics_exporter import serve

    s = get_settings()
    host, port = host or s.metrics_host, port or s.metrics_port
    typer.echo(f"serving fleet metrics on http://{host}:{port}/metrics")
    serve(host, port)


@cli.command()
def gateway(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Ollama's port, so clients need no change")] = 11434,
    log_level: Annotated[str, typer.Option(help="debug, info, warning...")] = "info",
    access_log: Annotated[bool, typer.Option(help="log every request")] = True,
) -> None:
    """Serve Ollama's and OpenAI's APIs (and /jobs) in front of the fleet."""
    from app.db import shown_url
    from app.gateway.server import serve

    s = get_settings()
    auth = "API keys required" if s.gateway_auth else "auth OFF (CORRAL_GATEWAY_AUTH=false)"
    typer.echo(f"gateway on http://{host}:{port} ({auth}; keys in {shown_url(s.database_url)})")
    serve(host, port, log_level=log_level, access_log=access_log)


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(ctx: typer.Context) -> None:
    """Run Flower with Corral's queues in its Broker tab from the start.

    Every option is Flower's, e.g. ``corral flower --conf=flower/flowerconfig.py --port=5555``.
    """
    from app.ops.flower import main as run_flower

    run_flower(ctx.args)


keys_cli = typer.Typer(help="API keys of the gateway (stored hashed in CORRAL_DATABASE_URL).")
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("add")
def keys_add(
    agent: Annotated[str, typer.Option(help="agent name the key's jobs carry")],
    agent_class: Annotated[str, typer.Option(help="kind of agent, e.g. planner, batch-etl")],
    tiers: Annotated[str, typer.Option(help="tiers it may use, e.g. interactive,normal")],
    default_tier: Annotated[str | None, typer.Option(help="tier when none is asked for")] = None,
    admin: Annotated[bool, typer.Option(help="may also change the fleet (/admin API)")] = False,
) -> None:
    """Create a key and print it: it is shown this once, only its hash is stored."""
    from app.gateway.api_keys import KeyStore

    try:
        key, info = KeyStore.ready().add(agent, agent_class, tiers, default_tier, admin=admin)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(key)
    typer.echo(
        f"id {info.id}, agent {info.agent} ({info.agent_class}), tiers {','.join(info.tiers)},"
        f" default {info.default_tier}{', ADMIN' if info.admin else ''}."
        " Store it now: it cannot be shown again.",
        err=True,
    )


@keys_cli.command("list")
def keys_list(
    revoked: Annotated[bool, typer.Option("--revoked", help="include revoked keys")] = False,
) -> None:
    """One line per key: id, prefix, agent, class, tiers, default tier, created, admin."""
    from app.gateway.api_keys import KeyStore

    infos = KeyStore.ready().all(include_revoked=revoked)
    for k in infos:
        gone = f"  REVOKED {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else ""
        gone = ("  ADMIN" if k.admin else "") + gone
        typer.echo(
            f"{k.id:4}  {k.prefix}...  {k.agent:20} {k.agent_class:12} {','.join(k.tiers):26}"
            f" default {k.default_tier:12} created {k.created_at:%Y-%m-%d %H:%M}{gone}"
        )
    typer.echo(f"{len(infos)} key(s)")


@keys_cli.command("revoke")
def keys_revoke(
    ref: Annotated[str, typer.Argument(help="the key's id, its prefix (crl_...) or the key")],
) -> None:
    """Revoke a key; gateways refuse it within gateway_key_cache_ttl seconds."""
    from app.gateway.api_keys import KeyStore

    info = KeyStore.ready().revoke(ref)
    if info is None:
        raise typer.BadParameter(f"no live key matches {ref!r}; see `corral keys list`")
    typer.echo(f"revoked key {info.id} ({info.prefix}..., agent {info.agent})")


db_cli = typer.Typer(help="Corral's database schema (Alembic migrations in app/migrations).")
cli.add_typer(db_cli, name="db")


@db_cli.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
) -> None:
    """Migrate CORRAL_DATABASE_URL to the latest schema (the gateway does it at start too)."""
    from app.db import shown_url
    from app.migrations import upgrade

    url = get_settings().database_url
    upgrade(url, revision)
    typer.echo(f"database at {shown_url(url)} is at {revision}")


def main() -> None:
    cli(prog_name="corral")


if __name__ == "__main__":
    main()
