"""ASGI app of one simulated Ollama server: routing, model catalogue and /sim/* control.

Control endpoints (not part of Ollama):

* ``GET /sim/stats``: counters and peaks (see ``stats.py``), queue depth, loaded models,
  current fault knobs.
* ``POST /sim/reset``: zero the counters; peaks restart from the current values.
* ``GET|POST /sim/faults``: read or change fault knobs, ``speed`` and ``slow_factor`` live;
  answers the new values (400 on an unknown knob or a value out of range).
* ``POST /sim/refuse {"seconds": N}``: stop listening for N seconds (needs the fleet runner).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from .config import SimInstance, SimModel, normalize_name
from .exchange import NDJSON, TEXT, ClientGone, Exchange, Receive, Scope, Send, hide_stream_cuts
from .inference import Inference, Work
from .protocol import HTTPError, dumps, expiry_time, field, local_time, parse_body
from .state import SimState

VERSION = "0.32.15"

Handler = Callable[[Exchange], Awaitable[None]]


class SimApp:
    """The ASGI callable; ``state`` is exposed for in-process inspection."""

    def __init__(self, instance: SimInstance) -> None:
        self.state = SimState(instance)
        inference = Inference(self.state)

        def infer(work: Work) -> Handler:
            return lambda ex: inference.handle(ex, work)

        self._routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": infer(inference.generate)},
            "/api/chat": {"POST": infer(inference.chat)},
            "/api/embed": {"POST": infer(inference.embed)},
            "/api/embeddings": {"POST": infer(inference.embeddings)},
            "/api/pull": {"POST": self._pull},
            "/api/delete": {"DELETE": self._delete},
            "/sim/stats": {"GET": self._stats},
            "/sim/spans": {"GET": self._spans},
            "/sim/events": {"GET": self._events},
            "/sim/reset": {"POST": self._reset},
            "/sim/faults": {"GET": self._faults, "POST": self._faults},
            "/sim/refuse": {"POST": self._refuse},
        }
        hide_stream_cuts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not part of the API
            return
        ex = Exchange(scope, receive, send)
        methods = self._routes.get(scope["path"])
        if methods is None:
            await ex.respond(404, b"404 page not found", TEXT)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await ex.respond(405, b"405 method not allowed", TEXT)
            return
        try:
            await handler(ex)
        except HTTPError as exc:
            await ex.json(exc.status, {"error": exc.message})
        except ClientGone:
            pass

    # -- catalogue -----------------------------------------------------------------------

    async def _root(self, ex: Exchange) -> None:
        await ex.respond(200, b"Ollama is running", TEXT)

    async def _version(self, ex: Exchange) -> None:
        await ex.json(200, {"version": VERSION})

    async def _tags(self, ex: Exchange) -> None:
        models = [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": local_time(self.state.added_at[m.name]),
                "size": m.size_bytes,
                "digest": _digest(m.name),
                "details": _details(m),
                "capabilities": _capabilities(m),
            }
            for m in self.state.catalog.values()
        ]
        await ex.json(200, {"models": models})

    async def _ps(self, ex: Exchange) -> None:
        now = time.time()
        entries = []
        for runner in self.state.scheduler.loaded.values():
            idle_since = now if runner.idle_since is None else runner.idle_since
            expires = idle_since + runner.keep_alive  # FOREVER (inf) sorts first
            model = runner.model
            entries.append(
                (
                    expires,
                    {
                        "name": model.name,
                        "model": model.name,
                        "size": model.size_bytes,
                        "digest": _digest(model.name),
                        "details": _details(model),
                        "expires_at": expiry_time(idle_since, runner.keep_alive),
                        "size_vram": model.size_bytes,
                        "context_length": runner.num_ctx,
                    },
                )
            )
        entries.sort(key=lambda e: e[0], reverse=True)
        await ex.json(200, {"models": [entry for _, entry in entries]})

    async def _show(self, ex: Exchange) -> None:
        body = parse_body(await ex.body(), "api.ShowRequest")
        name = _model_name(body, "ShowRequest")
        if not name:
            raise HTTPError(400, "model is required")
        full = normalize_name(name)
        model = self.state.catalog.get(full)
        if model is None:
            raise HTTPError(404, f"model '{full}' not found")
        arch = model.family
        await ex.json(
            200,
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {full}\n',
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _details(model),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": _parameter_count(model.parameter_size),
                    "general.quantization_version": 2,
                    f"{arch}.context_length": 2048 if model.kind == "embed" else 131072,
                    f"{arch}.embedding_length": model.embedding_length,
                },
                "tensors": [],
                "capabilities": _capabilities(model),
                "modified_at": local_time(self.state.added_at[full]),
            },
        )

    async def _pull(self, ex: Exchange) -> None:
        body = parse_body(await ex.body(), "api.PullRequest")
        name = _model_name(body, "PullRequest")
        if not name:
            raise HTTPError(400, "model is required")
        stream = field(body, "stream", bool, "PullRequest", "bool") is not False
        full = normalize_name(name)
        model = self.state.catalog.get(full)
        if model is None:
            model = SimModel(name=full, kind="embed" if "embed" in full else "chat")
            self.state.add_model(model)
        if not stream:
            await ex.json(200, {"status": "success"})
            return
        digest = _digest(full)
        layer = {"digest": f"sha256:{digest}", "total": model.size_bytes}
        statuses: list[dict[str, Any]] = [
            {"status": "pulling manifest"},
            {"status": f"pulling {digest[:12]}", **layer, "completed": 0},
            {"status": f"pulling {digest[:12]}", **layer, "completed": model.size_bytes},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        lines = "".join(dumps(status) + "\n" for status in statuses)
        await ex.respond(200, lines.encode(), NDJSON)

    async def _delete(self, ex: Exchange) -> None:
        body = parse_body(await ex.body(), "api.DeleteRequest")
        name = _model_name(body, "DeleteRequest")
        if not name:
            raise HTTPError(400, "model is required")
        if normalize_name(name) not in self.state.catalog:
            raise HTTPError(404, f"model '{name}' not found")
        self.state.remove_model(normalize_name(name))
        await ex.respond(200, b"")

    # -- simulator control ---------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        state = self.state
        return {
            "instance": state.cfg.name,
            "port": state.cfg.port,
            **state.stats.snapshot(),
            "queue_depth": state.scheduler.queue_depth,
            "loading": state.scheduler.loading,
            "loaded_models": sorted(state.scheduler.loaded),
            "faults": state.cfg.faults(),
        }

    async def _stats(self, ex: Exchange) -> None:
        await ex.json(200, self._snapshot())

    async def _spans(self, ex: Exchange) -> None:
        """When each request held a slot: ``[[taken, freed], ...]`` in Unix seconds."""
        await ex.json(
            200,
            {"num_parallel": self.state.cfg.num_parallel, "spans": list(self.state.stats.spans)},
        )

    async def _events(self, ex: Exchange) -> None:
        """Each load, unload and slot held: ``[[kind, model, start, end], ...]`` in Unix
        seconds (an unload has start = end)."""
        await ex.json(200, {"events": list(self.state.stats.events)})

    async def _reset(self, ex: Exchange) -> None:
        await ex.body()
        self.state.stats.reset()
        await ex.json(200, self._snapshot())

    async def _faults(self, ex: Exchange) -> None:
        if ex.scope["method"] == "GET":
            await ex.json(200, self.state.cfg.faults())
            return
        body = parse_body(await ex.body(), "faults")
        try:
            await ex.json(200, self.state.update_faults(body))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise HTTPError(400, problems) from None

    async def _refuse(self, ex: Exchange) -> None:
        body = parse_body(await ex.body(), "refuse")
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise HTTPError(400, "seconds must be a positive number")
        if self.state.refuse is None:
            raise HTTPError(501, "refusing connections needs the fleet runner (run_fleet/serve)")
        await self.state.refuse(float(seconds))
        await ex.json(200, {"refusing_for": seconds})


def build_app(instance: SimInstance) -> SimApp:
    """An ASGI app simulating one Ollama server; serve it with ``serve``/``run_fleet``.

    Any ASGI server works, but ``/sim/refuse`` needs the fleet runner, and the app's
    asyncio objects bind to the first event loop that serves it.
    """
    return SimApp(instance)


def _model_name(body: dict[str, Any], struct: str) -> str:
    """``model``, or the older ``name`` field Ollama still accepts."""
    model = field(body, "model", str, struct, "string")
    return model or field(body, "name", str, struct, "string") or ""


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _details(model: SimModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": model.family,
        "families": [model.family],
        "parameter_size": model.parameter_size,
        "quantization_level": model.quantization_level,
    }


def _capabilities(model: SimModel) -> list[str]:
    return ["embedding"] if model.kind == "embed" else ["completion", "tools"]


def _parameter_count(size: str) -> int:
    """``"3.2B"`` -> 3200000000; 0 if the label is not a number with a K/M/B/T suffix."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(size[-1:].upper())
    try:
        return int(float(size[:-1]) * scale) if scale else 0
    except ValueError:
        return 0
