"""Scheduled batch jobs: fan a folder or an inputs file out as ``infer`` jobs at tier batch.

``corral beat`` sends ``embed_folder`` / ``prompt_file`` to the ``<ns>.batch`` queue, which
the batch router consumes. A run publishes one ``infer`` job per input not done yet and
returns at once: it never waits for a result (Celery forbids ``.get()`` in a task, and a
waiting thread would be lost to the router). Each job carries a ``link`` to ``record``, which
appends its result to the schedule's JSONL output, and a ``link_error`` to
``record_failure``; both also run on ``<ns>.batch``.

An input is done once its exact request (``InferRequest.cache_key``: model, text, options)
has been recorded: ``<ns>:batch:<schedule>:done`` maps each input id to that digest, so an
unchanged document is never embedded twice, and a changed one is embedded again. While a
job is in flight, its ``job_key`` (schedule, input, digest) keeps the next runs from
submitting it again. A failed input gets an error line and is tried again once that key
expires (``result_expires``), or when it changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from celery.utils import uuid

from app import queues
from app.celery_app import celery_app
from app.schedules import EmbedFolder, PromptFile
from app.schemas import InferResult
from app.settings import get_settings
from app.state import keys
from app.state.client import redis_client
from tasks.infer import infer, validate

#: One input: its id (a path, a line number, a record's id) and its ``infer`` fields.
Item = tuple[str, dict[str, Any]]


@celery_app.task(name="corral.batch.embed_folder")
def embed_folder(spec: dict[str, Any]) -> dict[str, int]:
    """Embed each new or changed file of ``spec.folder`` matching ``spec.pattern``."""
    schedule = EmbedFolder.model_validate(spec)
    return _submit(schedule, _documents(schedule))


@celery_app.task(name="corral.batch.prompt_file")
def prompt_file(spec: dict[str, Any]) -> dict[str, int]:
    """Run ``spec.prompt`` over each new or changed input of ``spec.inputs``."""
    schedule = PromptFile.model_validate(spec)
    # Every input is rendered before any is submitted: a bad record fails the run cleanly.
    return _submit(schedule, list(_prompts(schedule)))


@celery_app.task(name="corral.batch.record", ignore_result=True)
def record(
    result: dict[str, Any],
    *,
    schedule: str,
    input_id: str,
    output: str,
    route_queue: str,
    digest: str,
) -> None:
    """``link`` of a batch job: append its result to the output, mark its input done."""
    done, client = _done_key(schedule), _redis()
    if client.hget(done, input_id) == digest:
        return  # a redelivered callback: the line is already written
    answer = InferResult.model_validate(result)
    if answer.kind == "embed":
        value: Any = answer.embeddings[0] if answer.embeddings else None
    elif answer.kind == "chat":
        value = (answer.message or {}).get("content")
    else:
        value = answer.text
    _append(
        Path(output),
        {
            "schedule": schedule,
            "input_id": input_id,
            "job_id": answer.id,
            "model": answer.model,
            "route_queue": route_queue,
            "result": value,
            "routing": answer.routing.model_dump(mode="json"),
        },
    )
    client.hset(done, input_id, digest)


@celery_app.task(name="corral.batch.record_failure", ignore_result=True)
def record_failure(
    job_id: str, *, schedule: str, input_id: str, output: str, route_queue: str
) -> None:
    """``link_error`` of a batch job: append an error line; the input is not marked done."""
    # One positional argument, so Celery publishes this errback with the job id (to
    # <ns>.batch, like record) instead of calling it inside the failing instance's worker.
    # The error is stored by then.
    error = celery_app.AsyncResult(job_id).result
    _append(
        Path(output),
        {
            "schedule": schedule,
            "input_id": input_id,
            "job_id": job_id,
            "route_queue": route_queue,
            "error": f"{type(error).__name__}: {error}",
        },
    )


def _submit(schedule: EmbedFolder | PromptFile, items: list[Item]) -> dict[str, int]:
    done = _redis().hgetall(_done_key(schedule.name))
    counts = {"submitted": 0, "in_flight": 0, "done": 0}
    for input_id, fields in items:
        job = {**fields, "model": schedule.model, "tier": "batch", "agent": f"beat:{schedule.name}"}
        request = validate(job)
        digest = request.cache_key()
        if done.get(input_id) == digest:
            counts["done"] += 1
            continue
        meta = {
            "schedule": schedule.name,
            "input_id": input_id,
            "output": str(schedule.output),
            "route_queue": queues.route_queue(request.model, request.tier),
        }
        key = hashlib.sha256(f"{input_id}\0{digest}".encode()).hexdigest()
        job_id = uuid()
        sent = infer.apply_async(
            kwargs={**job, "job_key": f"batch:{schedule.name}:{key}"},
            task_id=job_id,
            link=record.s(**meta, digest=digest).set(queue=queues.batch_queue()),
            link_error=record_failure.s(**meta).set(queue=queues.batch_queue()),
        )
        # Another id back: an earlier run's job holds the key and is not recorded yet.
        counts["submitted" if sent.id == job_id else "in_flight"] += 1
    return counts


def _documents(schedule: EmbedFolder) -> list[Item]:
    if not schedule.folder.is_dir():
        raise FileNotFoundError(f"schedule {schedule.name}: no folder {schedule.folder}")
    items = []
    for path in sorted(schedule.folder.glob(schedule.pattern)):
        if not path.is_file() or path.name.startswith("."):
            continue
        text = path.read_text(errors="replace")
        if text.strip():
            items.append(
                (path.relative_to(schedule.folder).as_posix(), {"kind": "embed", "input": text})
            )
    return items


def _prompts(schedule: PromptFile) -> Iterator[Item]:
    lines = schedule.inputs.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{schedule.inputs}:{number}"
        if schedule.records:
            try:
                values = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from None
            if not isinstance(values, dict):
                raise ValueError(f"{where}: a record must be a JSON object")
            input_id = str(values.get("id", number))
        else:
            values, input_id = {"input": line}, str(number)
        try:
            prompt = schedule.prompt.format_map(values)
        except KeyError as exc:
            raise ValueError(f"{where}: no field {exc} for the prompt template") from None
        if schedule.kind == "chat":
            messages = [{"role": "system", "content": schedule.system}] if schedule.system else []
            fields: dict[str, Any] = {
                "kind": "chat",
                "messages": [*messages, {"role": "user", "content": prompt}],
            }
        else:
            fields = {"kind": "generate", "prompt": prompt, "system": schedule.system}
        if schedule.options is not None:
            fields["options"] = schedule.options
        yield input_id, {k: v for k, v in fields.items() if v is not None}


def _append(output: Path, line: dict[str, Any]) -> None:
    """One JSON line, whole: router threads (and routers on one host) append concurrently."""
    output.parent.mkdir(parents=True, exist_ok=True)
    line["recorded_at"] = time.time()
    with output.open("a") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        out.write(json.dumps(line) + "\n")
        out.flush()


def _done_key(schedule: str) -> str:
    return keys.batch_done(get_settings().namespace, schedule)


def _redis() -> redis.Redis:
    return redis_client(get_settings().redis_url)
