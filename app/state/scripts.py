"""The Lua scripts of the state layer: read from ``lua/*.lua``, registered once per client.

Why Lua at all: each step of the slot bookkeeping (take a slot or wait, free a slot and hand
it to a waiter, take tokens from several buckets) reads and writes several keys and must be
atomic; a script is, and costs one round trip. Why files: Lua inside Python strings could not
be linted, highlighted or read on its own, and grew into copies of the same helpers.

A script may start with ``-- include: <file>.lua`` lines: the snippet's source is put in
place of the line, once per script (``bucket.lua``, the token bucket, is shared this way by
the agent rate limits and the slot scripts). A script is registered with redis-py
(``register_script``: EVALSHA, loaded again by redis-py if Redis lost it) once per client and
name. Several steps that must share one round trip go through :func:`pipelined`, which
sends their scripts as plain EVALSHA (redis-py would first check each with SCRIPT EXISTS, a
round trip of its own on every pipeline).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import cache
from importlib.resources import files
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r"^-- include: (\S+\.lua)[ \t]*$", re.MULTILINE)
_registered: weakref.WeakKeyDictionary[redis.Redis, dict[str, Script]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>``, with its includes put in place (each file once)."""
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:
            return ""
        seen.add(file)
        text = files("app.state").joinpath("lua", file).read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def script(client: redis.Redis, name: str) -> Script:
    """The registered script ``lua/<name>`` for ``client`` (registered on first use)."""
    with _lock:
        scripts = _registered.setdefault(client, {})
        found = scripts.get(name)
        if found is None:
            found = scripts[name] = client.register_script(source(name))
        return found


def evalsha_on(
    pipe: Pipeline, client: redis.Redis, name: str, keys: Sequence[Any], args: Sequence[Any]
) -> None:
    """Queue the script ``lua/<name>`` on ``pipe`` (a pipeline :func:`pipelined` runs)."""
    pipe.evalsha(script(client, name).sha, len(keys), *keys, *args)


def pipelined(client: redis.Redis, queue: Callable[[Pipeline], None]) -> list[Any]:
    """Run what ``queue`` puts on a pipeline of ``client``, in one round trip.

    A script Redis no longer has (it restarted) fails the step with NOSCRIPT: the scripts are
    loaded and the whole is queued and run again, once. The other commands of the first try
    have run by then, so what ``queue`` puts there must bear running twice.
    """
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            queue(pipe)
            try:
                return pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                with _lock:
                    loaded = list(_registered.get(client, {}).values())
                for each in loaded:
                    client.script_load(each.script)
    raise AssertionError("unreachable")
