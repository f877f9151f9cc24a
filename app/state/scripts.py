"""The Lua scripts of the state layer: read from ``lua/*.lua``, registered once per client.

Why Lua at all: each step of the slot bookkeeping (take a slot or wait, free a slot and hand
it to a waiter, take tokens from several buckets) reads and writes several keys and must be
atomic; a script is, and costs one round trip. Why files: Lua inside Python strings could not
be linted, highlighted or read on its own, and grew into copies of the same helpers.

A script may start with ``-- include: <file>.lua`` lines: the snippet's source is put in
place of the line, once per script (``bucket.lua``, the token bucket, is shared this way by
the agent rate limits and the slot scripts). A script is registered with redis-py
(``register_script``: EVALSHA, loaded again by redis-py if Redis lost it) once per client and
name, and the same object serves pipelines of that client (``client=pipe``).
"""

from __future__ import annotations

import re
import threading
import weakref
from functools import cache
from importlib.resources import files

import redis
from redis.commands.core import Script

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
