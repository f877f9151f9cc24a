"""Scheduled batch jobs: the ``schedules`` setting, and real ``celery beat`` on the test fleet."""

from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.schedules import crontab
from pydantic import ValidationError
from typer.testing import CliRunner

from app.bench.harness import LocalFleet, wait_until
from app.bench.stack import Child
from app.celery_app import beat_schedule
from app.cli import cli
from app.queues import batch_queue, route_queue
from app.schedules import PromptFile
from app.settings import Settings, normalize_model
from app.state import keys
from tasks import infer
from tasks.batch import _prompts, prompt_file

CHAT = "llama3.2:3b"
EMBED = "nomic-embed-text"


def embed_schedule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "docs",
        "job": "embed_folder",
        "every": 60,
        "folder": "docs",
        "model": EMBED,
        "output": "out/docs.jsonl",
        **extra,
    }


def prompt_schedule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "questions",
        "job": "prompt_file",
        "cron": "0 3 * * *",
        "inputs": "questions.txt",
        "prompt": "Answer briefly: {input}",
        "model": CHAT,
        "output": "out/answers.jsonl",
        **extra,
    }


# The setting ----------------------------------------------------------------------------


def test_toml_schedules_become_the_beat_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "corral.toml"
    config.write_text(
        "[[schedules]]\n"
        'name = "docs"\njob = "embed_folder"\nevery = 30\nfolder = "/srv/docs"\n'
        'pattern = "**/*.md"\nmodel = "nomic-embed-text"\noutput = "/srv/out/docs.jsonl"\n'
        "[[schedules]]\n"
        'name = "nightly"\njob = "prompt_file"\ncron = "0 3 * * mon-fri"\n'
        'inputs = "/srv/in/tickets.jsonl"\nprompt = "Classify: {subject}"\nkind = "chat"\n'
        'model = "llama3.2:3b"\noutput = "/srv/out/labels.jsonl"\n'
        "options = { temperature = 0 }\n"
    )
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    schedules = Settings().schedules
    entries = beat_schedule(schedules)

    assert entries["docs"]["task"] == "corral.batch.embed_folder"
    assert entries["docs"]["schedule"] == timedelta(seconds=30)
    assert entries["docs"]["options"] == {"queue": batch_queue(), "expires": 30}
    assert entries["docs"]["kwargs"]["spec"]["pattern"] == "**/*.md"
    nightly = entries["nightly"]
    assert nightly["task"] == "corral.batch.prompt_file"
    assert nightly["schedule"] == crontab(minute="0", hour="3", day_of_week="mon-fri")
    assert nightly["options"] == {"queue": batch_queue()}
    assert nightly["kwargs"]["spec"]["options"] == {"temperature": 0}


def test_env_schedules_resolve_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CORRAL_SCHEDULES", json.dumps([embed_schedule()]))
    [schedule] = Settings().schedules
    # Beat sends absolute paths: the router running the job has another working directory.
    assert schedule.folder == tmp_path / "docs"
    assert schedule.output == tmp_path / "out" / "docs.jsonl"


BAD_SCHEDULES = [
    (embed_schedule(cron="* * * * *"), "either 'every'"),
    (embed_schedule(every=None), "either 'every'"),
    (embed_schedule(every=0), "greater than 0"),
    (embed_schedule(every=None, cron="*/5 * *"), "bad cron"),
    (embed_schedule(every=None, cron="0 25 * * *"), "bad cron '0 25"),
    (embed_schedule(job="crawl"), "does not match any of the expected tags"),
    (embed_schedule(folder=None), "folder"),
    (embed_schedule(name="no spaces"), "pattern"),
    (embed_schedule(inputs="x.txt"), "Extra inputs are not permitted"),
    (prompt_schedule(prompt="About {title}"), "may only use {input}"),
    (prompt_schedule(prompt="About {input} }"), "bad prompt template"),
    (prompt_schedule(inputs="q.jsonl", prompt="About {0}"), "plain names"),
    (prompt_schedule(options={"temprature": 0}), "temprature"),
    (prompt_schedule(kind="embed"), "kind"),
]


@pytest.mark.parametrize(("schedule", "mentions"), BAD_SCHEDULES)
def test_bad_schedule_is_a_clear_error(schedule: dict[str, Any], mentions: str) -> None:
    with pytest.raises(ValidationError, match="schedules") as info:
        Settings(schedules=[schedule])
    assert mentions in str(info.value)


def test_schedule_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="docs repeated"):
        Settings(schedules=[embed_schedule(), embed_schedule(folder="other")])


def test_prompt_file_renders_records_and_names_bad_lines(tmp_path: Path) -> None:
    inputs = tmp_path / "tickets.jsonl"
    inputs.write_text('{"id": "t1", "subject": "refund"}\n\n{"subject": "login"}\n')
    schedule = PromptFile.model_validate(
        prompt_schedule(inputs=str(inputs), prompt="Classify: {subject}", system="Be terse.")
    )
    assert list(_prompts(schedule)) == [
        ("t1", {"kind": "generate", "prompt": "Classify: refund", "system": "Be terse."}),
        ("3", {"kind": "generate", "prompt": "Classify: login", "system": "Be terse."}),
    ]
    inputs.write_text('{"id": "t1", "subject": "refund"}\n{"id": "t2"}\n')
    with pytest.raises(ValueError, match=r"tickets.jsonl:2: no field 'subject'"):
        list(_prompts(schedule))


def test_beat_without_schedules_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings with no schedules, whatever the process read before: with some, beat would run.
    monkeypatch.setattr("app.cli.get_settings", lambda: Settings(schedules=[]))
    result = CliRunner().invoke(cli, ["beat"])
    assert result.exit_code == 1
    assert "no schedules configured" in result.output


# Real celery beat on the test fleet --------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a file a router may be appending to."""
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete]


def finished_jobs() -> Counter[tuple[str, str]]:
    """Jobs finished per (model, tier), as the instance workers recorded them in Redis."""
    from app.state.fleet import fleet_state

    state = fleet_state()
    counts: Counter[tuple[str, str]] = Counter()
    for field, value in state.redis.hgetall(
        keys.metrics(state.ns, "corral_jobs_finished_total")
    ).items():
        model, tier, _outcome = json.loads(field)
        counts[model, tier] += int(float(value))
    return counts


@pytest.fixture
def beat(
    healthy_fleet: LocalFleet, tmp_path: Path
) -> Iterator[Callable[[list[dict[str, Any]]], Child]]:
    """A function starting `corral beat` with the given schedules; stopped by PID after."""
    started: list[Child] = []

    def start(schedules: list[dict[str, Any]]) -> Child:
        env = {**healthy_fleet.env, "CORRAL_SCHEDULES": json.dumps(schedules)}
        argv = [sys.executable, "-m", "app.cli", "beat"]
        argv += ["--schedule-file", str(tmp_path / "celerybeat-schedule")]
        child = Child("beat", argv, env, log_dir=tmp_path)
        child.start()
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


@pytest.mark.fleet
def test_beat_runs_batches_at_batch_tier_without_delaying_interactive_jobs(
    healthy_fleet: LocalFleet, beat: Callable[[list[dict[str, Any]]], Child], tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    run = uuid.uuid4().hex  # text no earlier job embedded: no cache hits
    # ~600 words: the simulator embeds ~2000 words/s, one text at a time per instance, so 36
    # documents keep the fleet busy for several seconds.
    words = " ".join(f"w{i}" for i in range(600))
    for i in range(36):
        (docs / f"doc{i:02}.txt").write_text(f"{run} document {i} {words}")
    (docs / ".hidden").write_text("not a document")
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text(
        "".join(json.dumps({"id": f"q{i}", "topic": f"{run} {i}"}) + "\n" for i in range(3))
    )
    embedded, answers = tmp_path / "out" / "docs.jsonl", tmp_path / "out" / "answers.jsonl"
    before = finished_jobs()

    child = beat(
        [
            embed_schedule(every=1, folder=str(docs), pattern="*.txt", output=str(embedded)),
            prompt_schedule(
                every=1,
                cron=None,
                inputs=str(inputs),
                prompt="One line about {topic}.",
                kind="chat",
                options={"num_predict": 4},
                output=str(answers),
            ),
        ]
    )
    wait_until(lambda: read_jsonl(embedded), 60, "the first embedding")

    # Interactive jobs meanwhile, one after another, while the batch backlog waits.
    interactive = []
    for i in range(5):
        job = infer.delay(model=CHAT, prompt=f"{run} urgent {i}", tier="interactive")
        interactive.append(job.get(timeout=30))
    lines = wait_until(
        lambda: len(read_jsonl(embedded)) >= 36 and read_jsonl(embedded), 90, "36 lines"
    )

    # One embedding per document, each run at the batch tier.
    assert sorted(line["input_id"] for line in lines) == [f"doc{i:02}.txt" for i in range(36)]
    model = normalize_model(EMBED)
    for line in lines:
        assert line["route_queue"] == route_queue(model, "batch")
        assert line["routing"]["instance"] in healthy_fleet.sim_urls
        assert len(line["result"]) == 768 and "error" not in line
    answered = wait_until(
        lambda: len(read_jsonl(answers)) >= 3 and read_jsonl(answers), 30, "answers"
    )
    assert sorted(a["input_id"] for a in answered) == ["q0", "q1", "q2"]
    assert all(a["result"] and a["route_queue"] == route_queue(CHAT, "batch") for a in answered)
    # The instance workers ran exactly those jobs, all at the batch tier (a job is counted
    # once its result is stored, which can be just after its line is written).
    wait_until(lambda: (finished_jobs() - before)[model, "batch"] >= 36, 10, "job metrics")
    ran = finished_jobs() - before
    assert ran[model, "batch"] == 36 and ran[model, "interactive"] == ran[model, "normal"] == 0
    assert ran[CHAT, "batch"] == 3 and ran[CHAT, "interactive"] == 5

    # The interactive jobs overtook the backlog: each waited about a service time for a
    # slot, while batch jobs queued behind each other, and batch work was still left.
    batch_waits = sorted(line["routing"]["wait_s"] for line in lines)
    service = max(line["routing"]["service_s"] for line in lines)
    waits = [r.routing.wait_s for r in interactive]
    assert max(waits) < 2 * service + 0.5, (waits, service)
    assert max(waits) < batch_waits[-1] / 2, (waits, batch_waits)
    last_urgent = max(r.routing.finished_at for r in interactive)
    assert any(line["routing"]["finished_at"] > last_urgent for line in lines)

    # Later runs embed only what is new or changed, and nothing twice.
    (docs / "doc03.txt").write_text(f"{run} document 3, edited")
    (docs / "new.txt").write_text(f"{run} a new document")
    wait_until(lambda: len(read_jsonl(embedded)) >= 38, 30, "the new and changed documents")
    sent = child.log.read_text().count("Sending due task docs")
    wait_until(
        lambda: child.log.read_text().count("Sending due task docs") >= sent + 3, 20, "3 runs"
    )
    lines = read_jsonl(embedded)
    per_doc = Counter(line["input_id"] for line in lines)
    assert len(lines) == 38 and per_doc["doc03.txt"] == 2 and per_doc["new.txt"] == 1
    assert all(n == 1 for doc, n in per_doc.items() if doc != "doc03.txt")
    assert len(read_jsonl(answers)) == 3
    assert child.alive(), "beat exited"


@pytest.mark.fleet
def test_failed_batch_job_gets_an_error_line_and_is_not_marked_done(
    healthy_fleet: LocalFleet, tmp_path: Path
) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    inputs, output = tmp_path / "questions.txt", tmp_path / "answers.jsonl"
    inputs.write_text(f"\n{uuid.uuid4().hex} question\n")  # one input, on line 2
    spec = PromptFile.model_validate(
        prompt_schedule(name="failing", inputs=str(inputs), output=str(output))
    ).model_dump(mode="json")

    # What beat sends, sent here: a run returns once its jobs are published.
    first = prompt_file.apply_async(kwargs={"spec": spec}, queue=batch_queue())
    assert first.get(timeout=30) == {"submitted": 1, "in_flight": 0, "done": 0}
    [line] = wait_until(lambda: read_jsonl(output), 60, "the error line")
    assert line["input_id"] == "2" and "result" not in line
    assert line["error"].startswith("RetriesExhausted"), line

    # Not done, so not skipped; its job key still names the failed job, so not resubmitted.
    again = prompt_file.apply_async(kwargs={"spec": spec}, queue=batch_queue())
    assert again.get(timeout=30) == {"submitted": 0, "in_flight": 1, "done": 0}
    assert len(read_jsonl(output)) == 1
