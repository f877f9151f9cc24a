"""``corral policy``: look at the rate-limit policy and change it live.

Every change goes to the registry database (``CORRAL_DATABASE_URL``) and into Redis at once
(see ``app.fleet.policy_admin``); every process applies it within a second, without a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from app.fleet.policy_admin import ClassView, PolicyAdmin
    from app.settings import AgentClass

policy_cli = typer.Typer(
    help="Look at and change the agent classes' rate limits and bulkheads; changes apply live."
)

#: What a limit option takes to lift the limit.
NONE = "none"

Agents = Annotated[
    list[str] | None,
    typer.Option(
        "--agents",
        help="agent name pattern of the class, e.g. 'opus-*' (repeatable; replaces the list;"
        " '' empties it)",
    ),
]
RatePerMinute = Annotated[
    str | None,
    typer.Option(metavar="X|none", help="jobs a minute for the whole class; 'none' lifts it"),
]
AgentRatePerMinute = Annotated[
    str | None,
    typer.Option(metavar="X|none", help="jobs a minute for each agent of it; 'none' lifts it"),
]
OnLimit = Annotated[
    str | None,
    typer.Option(metavar="wait|refuse", help="over the limit: wait for its turn, or refuse"),
]
MaxInFlight = Annotated[
    str | None,
    typer.Option(metavar="N|none", help="bulkhead: slots it may hold at once; 'none' lifts it"),
]


def _limit(option: str, value: str, kind: type[float] | type[int]) -> float | int | None:
    if value.strip().lower() == NONE:
        return None
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise typer.BadParameter(f"{value!r} is not {what} or 'none'", param_hint=option) from None


def _admin() -> PolicyAdmin:
    from app.fleet.cli import opened
    from app.fleet.policy_admin import PolicyAdmin

    return opened(PolicyAdmin.ready)


@contextmanager
def _refused() -> Iterator[None]:
    """A change the policy refuses: its message, exit status 1."""
    from app.fleet.policy_admin import PolicyConflict, reason
    from app.fleet.policy_store import UnknownClass

    try:
        yield
    except (UnknownClass, PolicyConflict) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"error: {reason(exc)}", err=True)
        raise typer.Exit(1) from None


def _per_minute(value: float | None) -> str:
    return "-" if value is None else f"{value:g}/min"


def _global(rate: float | None) -> str:
    return f"global rate: {'unlimited' if rate is None else f'{rate:g} jobs a minute'}"


def _summary(c: AgentClass) -> str:
    return (
        f"agents {', '.join(c.agents) or '(none: only a key or agent_class= puts jobs in it)'};"
        f" {_per_minute(c.rate_per_minute)} for the class,"
        f" {_per_minute(c.agent_rate_per_minute)} per agent, {c.on_limit} over the limit,"
        f" max in flight {c.max_in_flight or '-'}"
    )


HEADER = f"{'CLASS':16} {'RATE':>10} {'PER AGENT':>10} {'ON LIMIT':8} {'IN FLIGHT':>9}  AGENTS"


def _line(v: ClassView) -> str:
    c = v.config
    rate, per_agent = _per_minute(c.rate_per_minute), _per_minute(c.agent_rate_per_minute)
    notes = [
        n for n, on in (("from the file", v.in_file), ("not yet in force", not v.applied)) if on
    ]
    return (
        f"{v.name:16} {rate:>10} {per_agent:>10} {c.on_limit:8} {c.max_in_flight or '-':>9}"
        f"  {', '.join(c.agents) or '-'}" + (f"  ({'; '.join(notes)})" if notes else "")
    )


@policy_cli.command("list")
def policy_list() -> None:
    """The global rate and every agent class with its limits."""
    admin = _admin()
    typer.echo(_global(admin.global_rate()))
    views = admin.views()
    if not views:
        typer.echo("no agent classes: every agent is in class default, without limits")
        return
    typer.echo(HEADER)
    for view in views:
        typer.echo(_line(view))
    typer.echo("agents matching no class are in class default")


@policy_cli.command("show")
def policy_show(name: str) -> None:
    """One class: its row and whether it is in force, as JSON."""
    admin = _admin()
    with _refused():
        view = admin.view(name)
    typer.echo(json.dumps(view.as_dict(), indent=2, sort_keys=True))


@policy_cli.command("set")
def policy_set(
    name: str,
    agents: Agents = None,
    rate_per_minute: RatePerMinute = None,
    agent_rate_per_minute: AgentRatePerMinute = None,
    on_limit: OnLimit = None,
    max_in_flight: MaxInFlight = None,
) -> None:
    """Create a class or change it; only the options given change."""
    fields: dict[str, Any] = {}
    if agents is not None:
        fields["agents"] = [a for a in agents if a.strip()]
    if rate_per_minute is not None:
        fields["rate_per_minute"] = _limit("--rate-per-minute", rate_per_minute, float)
    if agent_rate_per_minute is not None:
        fields["agent_rate_per_minute"] = _limit(
            "--agent-rate-per-minute", agent_rate_per_minute, float
        )
    if on_limit is not None:
        if on_limit not in ("wait", "refuse"):
            raise typer.BadParameter("must be wait or refuse", param_hint="--on-limit")
        fields["on_limit"] = on_limit
    if max_in_flight is not None:
        fields["max_in_flight"] = _limit("--max-in-flight", max_in_flight, int)
    if not fields:
        raise typer.BadParameter("give at least one option to change; see --help")
    admin = _admin()
    with _refused():
        config, created = admin.set(name, **fields)
    typer.echo(f"{'created' if created else 'changed'} {name}: {_summary(config)}")
    typer.echo("in force now; every process applies it within a second")


@policy_cli.command("remove")
def policy_remove(name: str) -> None:
    """Remove a class: its agents fall to the next class they match, or default."""
    admin = _admin()
    with _refused():
        admin.remove(name)
    typer.echo(f"removed {name}; its agents are now in the next class they match, or default")


@policy_cli.command("global")
def policy_global(
    rate_per_minute: Annotated[
        float | None, typer.Option(help="jobs a minute started across every agent")
    ] = None,
    none: Annotated[bool, typer.Option("--none", help="lift the global limit")] = False,
) -> None:
    """Show the global rate, or change it (--rate-per-minute X, or --none to lift it)."""
    if rate_per_minute is not None and none:
        raise typer.BadParameter("give --rate-per-minute X or --none, not both")
    admin = _admin()
    if rate_per_minute is None and not none:
        typer.echo(_global(admin.global_rate()))
        return
    with _refused():
        rate = admin.set_global_rate(None if none else rate_per_minute)
    typer.echo(f"{_global(rate)}; in force now")
