"""The inference endpoints: /api/generate, /api/chat, /api/embed, /api/embeddings.

Each request follows Ollama's path: validate, get a runner from the scheduler (maybe
loading it), wait for a slot, evaluate the prompt, then produce tokens at the model's rate,
slowed down by the other busy slots.  Time is simulated with sleeps; the CPU work per
request is kept to string building so one process can serve hundreds of requests/s.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

from .config import SimModel, normalize_name
from .exchange import JSON, NDJSON, Exchange, StreamCut
from .protocol import (
    HTTPError,
    dumps,
    field,
    go_kind,
    parse_body,
    parse_keep_alive,
    parse_options,
)
from .scheduler import BUSY_MESSAGE, DEFAULT_NUM_CTX, Runner
from .state import SimState
from .stats import ModelStats
from .text import approx_tokens, completion_tokens, embedding_json, token_ids
from .tools import tool_calls

Work = Callable[[Exchange, bytes], Awaitable[None]]

RUNNER_CRASH = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details"
)
_ERROR_LINE = (dumps({"error": RUNNER_CRASH}) + "\n").encode()

# asyncio cannot sleep much more precisely than a couple of milliseconds, and every wake-up
# costs CPU, so shorter per-token delays are added up and slept in one go.
STREAM_BATCH_S = 0.002
# Without streaming nobody sees intermediate tokens; waking rarely only coarsens how
# quickly a change in the number of busy slots affects this request's speed.
QUIET_BATCH_S = 0.05


@dataclass(slots=True)
class _Completion:
    """What one generate/chat request has to produce once it holds a slot."""

    name: str  # as the client sent it: Ollama echoes req.Model
    chat: bool
    stream: bool
    runner: Runner
    stats: ModelStats
    tokens: list[str]
    done_reason: str
    prompt_tokens: int
    context: list[int] | None  # generate's context without the answer; None for chat or raw
    started_ns: int
    load_ns: int
    tool_calls: list[dict[str, Any]]  # the answer when not empty (chat with tools only)


class Inference:
    def __init__(self, state: SimState) -> None:
        self.s = state

    async def handle(self, ex: Exchange, work: Work) -> None:
        """Run one request to an inference endpoint, cancelled if the client leaves (counted
        in ``in_flight`` by :meth:`_tracking` if it is inference, not model management)."""
        raw = await ex.body()
        stats = self.s.stats
        stats.requests_total += 1
        ex.watch_disconnect()
        try:
            await work(ex, raw)
        except (HTTPError, StreamCut):
            stats.errors_total += 1
            raise
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise
            # Ours, not the server's: swallow it so uvicorn sees a quiet end of request.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            stats.cancelled()
        finally:
            ex.stop_watching()

    # -- generate / chat ---------------------------------------------------------------

    async def generate(self, ex: Exchange, raw: bytes) -> None:
        await self._complete(ex, raw, chat=False)

    async def chat(self, ex: Exchange, raw: bytes) -> None:
        await self._complete(ex, raw, chat=True)

    async def _complete(self, ex: Exchange, raw: bytes, chat: bool) -> None:
        struct = "ChatRequest" if chat else "GenerateRequest"
        body = parse_body(raw, f"api.{struct}")
        name = field(body, "model", str, struct, "string") or ""
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        stream = field(body, "stream", bool, struct, "bool")
        context: list[int] | None = None
        calls: list[dict[str, Any]] = []
        if chat:
            messages = _messages(body)
            calls = tool_calls(body, messages)
            empty = not messages
            key_text = "\x1e".join(f"{role}\x1f{content}" for role, content in messages)
            # Each message costs its words plus the role header of the chat template.
            prompt_tokens = sum(approx_tokens(content) + 4 for _, content in messages)
        else:
            prompt = field(body, "prompt", str, struct, "string") or ""
            system = field(body, "system", str, struct, "string") or ""
            prior = field(body, "context", list, struct, "[]int") or []
            empty = not prompt
            key_text = f"{system}\x1e{prompt}"
            prompt_tokens = approx_tokens(system) + approx_tokens(prompt) + len(prior) + 1
            if not body.get("raw"):
                context = prior + token_ids(f"{system} {prompt}", [])
            if not name:  # Ollama's generate has no "model is required" check
                raise HTTPError(404, "model '' not found")
        if not name:
            raise HTTPError(400, "model is required")
        model = self.s.catalog.get(normalize_name(name))
        if model is None:
            raise HTTPError(404, f"model '{name}' not found")
        if empty and keep_alive == 0:
            # Before the capability checks, as in Ollama's handlers (routes.go): `ollama stop`
            # unloads an embedding model through /api/generate too.
            with self._tracking(model, inference=False):
                self.s.scheduler.unload(model.name)
                await ex.json(200, self._bare_reply(name, chat, "unload"))
                return
        if model.kind == "embed":
            raise HTTPError(400, f'"{name}" does not support {"chat" if chat else "generate"}')
        if body.get("think") not in (None, False):
            raise HTTPError(400, f'"{name}" does not support thinking')
        options = parse_options(body.get("options"), struct)

        with self._tracking(model, inference=not empty) as model_stats:
            self._maybe_busy()
            started = perf_counter_ns()
            runner = await self.s.scheduler.acquire(model, _num_ctx(options), keep_alive)
            try:
                load_ns = perf_counter_ns() - started
                if empty:
                    await ex.json(200, self._bare_reply(name, chat, "load"))
                    return
                count, done_reason = _length(options, model)
                if calls:  # the call is the answer: its tokens, and no text
                    count, done_reason = approx_tokens(dumps(calls)), "stop"
                seed = options.get("seed")
                deterministic = options.get("temperature") == 0 or (seed is not None and seed >= 0)
                rng = None if deterministic else self.s.rng
                job = _Completion(
                    name=name,
                    chat=chat,
                    stream=stream is not False,  # Ollama streams unless told not to
                    runner=runner,
                    stats=model_stats,
                    tokens=completion_tokens(count, rng, model.name, key_text, seed),
                    done_reason=done_reason,
                    prompt_tokens=prompt_tokens,
                    context=context,
                    started_ns=started,
                    load_ns=load_ns,
                    tool_calls=calls,
                )
                async with self._slot(runner, model_stats):
                    await self._runner_faults()
                    await self._produce(ex, job)
            finally:
                self.s.scheduler.release(runner)

    async def _produce(self, ex: Exchange, job: _Completion) -> None:
        runner = job.runner
        prompt_start = perf_counter_ns()
        await self._compute(job.prompt_tokens, runner.model.prompt_tokens_per_second, runner)
        prompt_ns = perf_counter_ns() - prompt_start

        tokens = job.tokens
        fault = self._output_fault()
        # Ollama's parser holds a tool call back until it is whole: its tokens take their
        # time but stream no text, and the call goes out in one chunk at the end.
        calling = bool(job.tool_calls)
        if fault:
            tokens = tokens[: max(1, len(tokens) // 2)]
        loop = asyncio.get_running_loop()
        threshold = STREAM_BATCH_S if job.stream else QUIET_BATCH_S
        unsent: list[str] = []
        eval_start = perf_counter_ns()
        due = loop.time()
        for token in tokens:
            due += self._token_delay(runner)
            if job.stream and not calling:
                unsent.append(token)
            wait = due - loop.time()
            if wait >= threshold:
                await asyncio.sleep(wait)
                if unsent:
                    await self._flush(ex, job, unsent)
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        eval_ns = perf_counter_ns() - eval_start

        if fault:
            if unsent:
                await self._flush(ex, job, unsent)
            await self._fail_output(ex, fault, job.stream, job.stats)
            return
        text = "" if calling else "".join(tokens)
        final: dict[str, Any] = {"model": job.name, "created_at": self.s.clock.utc_now()}
        content = "" if job.stream else text
        if job.chat:
            final["message"] = {"role": "assistant", "content": content}
            if calling and not job.stream:
                final["message"]["tool_calls"] = job.tool_calls
        else:
            final["response"] = content
        final["done"] = True
        final["done_reason"] = job.done_reason
        if job.context is not None:
            final["context"] = job.context + token_ids("", tokens)
        final["total_duration"] = perf_counter_ns() - job.started_ns
        final["load_duration"] = job.load_ns
        final["prompt_eval_count"] = job.prompt_tokens
        final["prompt_eval_duration"] = prompt_ns
        final["eval_count"] = len(tokens)
        final["eval_duration"] = eval_ns
        if job.stream:
            if calling:
                call = {"model": job.name, "created_at": final["created_at"]}
                message = {"role": "assistant", "content": "", "tool_calls": job.tool_calls}
                call_line = dumps(call | {"message": message, "done": False}) + "\n"
                await self._flush(ex, job, unsent, call_line + dumps(final) + "\n")
            else:
                await self._flush(ex, job, unsent, dumps(final) + "\n")
        else:
            await ex.json(200, final)

    async def _flush(
        self, ex: Exchange, job: _Completion, tokens: list[str], tail: str | None = None
    ) -> None:
        """Send the pending token lines (and the final line); the first flush sends headers."""
        head = '{"model":' + dumps(job.name) + ',"created_at":"' + self.s.clock.utc_now()
        if job.chat:
            lines = [
                f'{head}","message":{{"role":"assistant","content":{dumps(t)}}},"done":false}}\n'
                for t in tokens
            ]
        else:
            lines = [f'{head}","response":{dumps(t)},"done":false}}\n' for t in tokens]
        tokens.clear()
        if not ex.started:
            await ex.start(200, NDJSON)
        if tail is None:
            await ex.write("".join(lines).encode())
        else:
            lines.append(tail)
            await ex.finish("".join(lines).encode())

    def _bare_reply(self, name: str, chat: bool, reason: str) -> dict[str, Any]:
        """Answer of a load-only or unload request (empty prompt or no messages)."""
        reply: dict[str, Any] = {"model": name, "created_at": self.s.clock.utc_now()}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply["done"] = True
        reply["done_reason"] = reason
        return reply

    # -- embeddings --------------------------------------------------------------------

    async def embed(self, ex: Exchange, raw: bytes) -> None:
        body = parse_body(raw, "api.EmbedRequest")
        name = field(body, "model", str, "EmbedRequest", "string") or ""
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        inputs = _embed_inputs(body.get("input"))
        truncate = field(body, "truncate", bool, "EmbedRequest", "bool")
        dims = field(body, "dimensions", int, "EmbedRequest", "int") or 0
        if dims < 0:
            raise HTTPError(400, "dimensions must be a positive integer")
        model = self._embedding_model(name)
        options = parse_options(body.get("options"), "EmbedRequest")
        num_ctx = _num_ctx(options)

        with self._tracking(model, inference=bool(inputs)) as model_stats:
            self._maybe_busy()
            started = perf_counter_ns()
            runner = await self.s.scheduler.acquire(model, num_ctx, keep_alive)
            try:
                load_ns = perf_counter_ns() - started
                counts = [approx_tokens(text) for text in inputs]
                if truncate is False and any(c > num_ctx for c in counts):
                    raise HTTPError(400, "the input length exceeds the context length")
                # One pass over every input, on the runner's one slot (embedding models have
                # only one): a cost per call plus a cost per input, as a GPU's batch.
                if counts:  # no input: Ollama only loads the model
                    async with self._slot(runner, model_stats):
                        await self._runner_faults()
                        await self._embed_pass(model, counts, runner)
            finally:
                self.s.scheduler.release(runner)
            length = min(dims or model.embedding_length, model.embedding_length)
            vectors = ",".join(embedding_json(model.name, t, length, True) for t in inputs)
            await self._maybe_fail_output(ex, model_stats)
            data = (
                f'{{"model":{dumps(name)},"embeddings":[{vectors}],'
                f'"total_duration":{perf_counter_ns() - started},"load_duration":{load_ns},'
                f'"prompt_eval_count":{sum(counts)}}}'
            )
            await ex.respond(200, data.encode())

    async def embeddings(self, ex: Exchange, raw: bytes) -> None:
        """The legacy endpoint: one prompt, a raw (not normalised) vector."""
        body = parse_body(raw, "api.EmbeddingRequest")
        name = field(body, "model", str, "EmbeddingRequest", "string") or ""
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        prompt = field(body, "prompt", str, "EmbeddingRequest", "string") or ""
        if not name:
            raise HTTPError(400, "model is required")
        model = self._embedding_model(name)
        options = parse_options(body.get("options"), "EmbeddingRequest")

        with self._tracking(model, inference=bool(prompt)) as model_stats:
            self._maybe_busy()
            runner = await self.s.scheduler.acquire(model, _num_ctx(options), keep_alive)
            try:
                if prompt:
                    async with self._slot(runner, model_stats):
                        await self._runner_faults()
                        await self._compute(
                            approx_tokens(prompt), model.prompt_tokens_per_second, runner
                        )
            finally:
                self.s.scheduler.release(runner)
            vector = embedding_json(model.name, prompt, model.embedding_length, False)
            await self._maybe_fail_output(ex, model_stats)
            await ex.respond(200, f'{{"embedding":{vector if prompt else "[]"}}}'.encode())

    def _embedding_model(self, name: str) -> SimModel:
        model = self.s.catalog.get(normalize_name(name)) if name else None
        if model is None:
            raise HTTPError(404, f'model "{name}" not found, try pulling it first')
        return model

    # -- shared machinery --------------------------------------------------------------

    @contextmanager
    def _tracking(self, model: SimModel, *, inference: bool = True) -> Iterator[ModelStats]:
        """Count a request for ``model``: in ``in_flight`` while it is inside the server if it
        is ``inference``; a model-management call only in ``managed_total``."""
        stats, model_stats = self.s.stats, self.s.stats.model(model.name)
        model_stats.requests += 1
        if inference:
            stats.enter()
            model_stats.in_flight += 1
        else:
            stats.managed_total += 1
        try:
            yield model_stats
        except (HTTPError, StreamCut):
            model_stats.errors += 1
            raise
        finally:
            if inference:
                stats.leave()
                model_stats.in_flight -= 1

    @asynccontextmanager
    async def _slot(self, runner: Runner, model_stats: ModelStats) -> AsyncIterator[None]:
        await runner.slots.acquire()
        self.s.stats.slot_taken(model_stats)
        taken, started = time.time(), perf_counter_ns()
        try:
            yield
        finally:
            runner.slots.release()
            held = (perf_counter_ns() - started) / 1e9
            self.s.stats.slot_freed(model_stats, held)
            self.s.stats.span(taken, taken + held)
            self.s.stats.event("slot", runner.model.name, taken, taken + held)

    def _maybe_busy(self) -> None:
        if self.s.roll(self.s.cfg.busy_rate):
            self.s.stats.rejected_total += 1
            raise HTTPError(503, BUSY_MESSAGE)

    async def _runner_faults(self) -> None:
        """Faults of the runner itself, seen once the request holds a slot."""
        if self.s.roll(self.s.cfg.error_rate):
            raise HTTPError(500, RUNNER_CRASH)
        if not self.s.unhung.is_set():
            await self.s.unhung.wait()

    def _output_fault(self) -> str | None:
        cfg = self.s.cfg
        if self.s.roll(cfg.mid_stream_error_rate):
            return "error"
        if self.s.roll(cfg.cut_stream_rate):
            return "cut"
        return None

    async def _maybe_fail_output(self, ex: Exchange, model_stats: ModelStats) -> None:
        fault = self._output_fault()
        if fault:
            await self._fail_output(ex, fault, False, model_stats)

    async def _fail_output(
        self, ex: Exchange, fault: str, stream: bool, model_stats: ModelStats
    ) -> None:
        """End a response the way a crashing runner or a dropped connection would.

        Before the first byte an error still gets a real status; after it, Ollama can only
        append an ``{"error": ...}`` line to the 200 stream.
        """
        if fault == "error":
            if not ex.started:
                raise HTTPError(500, RUNNER_CRASH)
            self.s.stats.errors_total += 1
            model_stats.errors += 1
            await ex.finish(_ERROR_LINE)
            return
        if not ex.started:
            await ex.start(200, NDJSON if stream else JSON)
            await ex.write(b'{"model":')
        raise StreamCut

    def _speed_factor(self, runner: Runner) -> float:
        """Seconds multiplier from the instance speed and the other busy slots."""
        cfg = self.s.cfg
        crowd = 1 + cfg.parallel_slowdown * (runner.slots.busy - 1)
        return cfg.slow_factor / cfg.speed * crowd

    def _token_delay(self, runner: Runner) -> float:
        rate = runner.model.tokens_per_second
        if rate == 0 or math.isinf(rate):
            return 0.0
        return self._speed_factor(runner) / rate

    async def _embed_pass(self, model: SimModel, counts: list[int], runner: Runner) -> None:
        """The time of one /api/embed call over inputs of ``counts`` tokens."""
        per_input = model.embed_input_seconds
        if per_input is None:
            rate = model.prompt_tokens_per_second
            each = sum(counts) / rate if rate and not math.isinf(rate) else 0.0
        else:
            each = per_input * len(counts)
        seconds = model.embed_call_seconds + each
        if seconds:
            await asyncio.sleep(seconds * self._speed_factor(runner))

    async def _compute(self, tokens: int, rate: float, runner: Runner) -> None:
        """Sleep for the time ``tokens`` of prompt take at ``rate`` tokens/s (0/inf: no time)."""
        if tokens and rate and not math.isinf(rate):
            await asyncio.sleep(tokens / rate * self._speed_factor(runner))


def _num_ctx(options: dict[str, Any]) -> int:
    value = options.get("num_ctx")
    return int(value) if value is not None and value > 0 else DEFAULT_NUM_CTX


def _length(options: dict[str, Any], model: SimModel) -> tuple[int, str]:
    """How many tokens to produce and why the answer ends.

    The model "naturally" stops after ``default_num_predict`` tokens; an explicit
    non-negative ``num_predict`` sets the length exactly and ends with ``length``.
    """
    value = options.get("num_predict")
    if value is None or value < 0:
        return model.default_num_predict, "stop"
    return int(value), "length"


def _messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    """``(role, content)`` of each chat message, type-checked like Go's decoder would."""
    messages = field(body, "messages", list, "ChatRequest", "[]api.Message") or []
    result = []
    for message in messages:
        if not isinstance(message, dict):
            raise HTTPError(
                400,
                f"json: cannot unmarshal {go_kind(message)} into Go struct field "
                "ChatRequest.messages of type api.Message",
            )
        role = field(message, "role", str, "ChatRequest.messages", "string") or ""
        content = field(message, "content", str, "ChatRequest.messages", "string") or ""
        result.append((role.lower(), content))
    return result


def _embed_inputs(value: object) -> list[str]:
    """``input`` as a list; an empty string means no input, as in Ollama."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise HTTPError(400, "invalid input type")
