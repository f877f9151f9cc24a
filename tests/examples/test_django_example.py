"""examples/django, run as a person runs it (``manage.py runserver``, ``manage.py
submit_batch``) against the session's simulated fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from app.bench.harness import LocalFleet
from app.queues import route_queue
from app.settings import get_settings
from tasks import infer
from tests.examples.conftest import EXAMPLES, Published, Server

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
GOOD = {"model": MODEL, "prompt": "Why is the sky blue?", "tier": "interactive"}


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "django" / "manage.py"), *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_job_submitted_over_http_runs_on_the_fleet(
    healthy_fleet: LocalFleet, django_server: Server, published: Published
) -> None:
    answer = django_server.submit({**GOOD, "agent": "django-example"})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert published.until(job_id)[job_id] == route_queue(MODEL, "interactive")

    view = django_server.finished(job_id)
    assert view["state"] == "SUCCESS", view
    result = view["result"]
    assert result["id"] == job_id and result["kind"] == "generate" and result["text"]
    instance = result["routing"]["instance"]
    assert instance in healthy_fleet.sim_urls
    assert healthy_fleet.sim_stats(instance)["models"][MODEL]["requests"] >= 1


def test_bad_input_is_a_400_and_queues_nothing(
    healthy_fleet: LocalFleet,
    django_server: Server,
    published: Published,
    bad_request: tuple[object, str],
) -> None:
    body, message = bad_request
    answer = django_server.submit(body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]
    # A good job published after it is seen; nothing was published before it.
    sentinel = django_server.submit(GOOD).json()["id"]
    assert set(published.until(sentinel)) == {sentinel}
    assert django_server.finished(sentinel)["state"] == "SUCCESS"


def test_failed_job_polls_as_its_typed_error(
    healthy_fleet: LocalFleet, django_server: Server
) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    job_id = django_server.submit(GOOD).json()["id"]
    view = django_server.finished(job_id)
    assert view["state"] == "FAILURE", view
    error = view["error"]
    assert error["type"] == "RetriesExhausted" and "result" not in view
    assert {h["instance"] for h in error["history"]} == set(healthy_fleet.sim_urls)


def test_unknown_job_is_pending_and_a_malformed_id_is_404(django_server: Server) -> None:
    never_submitted = str(uuid.uuid4())
    answer = django_server.poll(never_submitted)
    assert answer.status_code == 200
    assert answer.json() == {"id": never_submitted, "state": "PENDING"}
    assert django_server.poll("not-a-job-id").status_code == 404


def test_celery_app_is_configured_from_django_settings_keeping_corrals(
    healthy_fleet: LocalFleet,
) -> None:
    code = (
        "import json; from config.celery_app import app; from tasks import infer; c = app.conf;"
        " print(json.dumps({'same_app': infer.app is app, 'namespace': app.namespace,"
        " 'max_retries': c.result_backend_max_retries, 'priority': c.task_queue_max_priority,"
        " 'acks_late': c.task_acks_late, 'prefetch': c.worker_prefetch_multiplier,"
        " 'serializer': c.task_serializer, 'options': c.broker_transport_options,"
        " 'broker': c.broker_url, 'default_queue': c.task_default_queue}))"
    )
    out = manage("shell", "--command", code)
    assert out.returncode == 0, out.stderr
    conf = json.loads(out.stdout.splitlines()[-1])
    settings = get_settings()
    assert conf == {
        "same_app": True,
        "namespace": "CELERY",
        "max_retries": 3,  # from config/settings.py
        "priority": 9,  # the rest is Corral's
        "acks_late": True,
        "prefetch": 1,
        "serializer": "json",
        "options": {"confirm_publish": True},
        "broker": settings.broker_url,
        "default_queue": f"{settings.namespace}.default",
    }


def test_submit_batch_waits_for_every_job(
    healthy_fleet: LocalFleet, published: Published, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first from the file\n\nsecond from the file\n")
    out = manage(
        "submit_batch", "--model", MODEL, "--file", str(prompts), "from the args", "--wait"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    ids, answers = lines[:3], lines[3:]
    assert len(answers) == 3, out.stdout
    for job_id, answer in zip(ids, answers, strict=True):
        instance = answer.removeprefix(f"{job_id} ").split(":")[0]
        assert instance in healthy_fleet.sim_urls, answer
        assert infer.AsyncResult(job_id).get(timeout=5).routing.instance == instance
    sent = published.until(ids[-1])
    assert all(sent[job_id] == route_queue(MODEL, "batch") for job_id in ids), sent


def test_submit_batch_prints_ids_without_waiting(healthy_fleet: LocalFleet) -> None:
    out = manage("submit_batch", "--model", MODEL, "one", "two")
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split()
    assert len(ids) == 2 and all(uuid.UUID(job_id) for job_id in ids)
    for job_id in ids:
        assert infer.AsyncResult(job_id).get(timeout=60).routing.instance in healthy_fleet.sim_urls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope:1b", "hi"], "no instance serves model 'nope:1b'"),
        (["--model", MODEL], "no prompts"),
    ],
    ids=["unserved model", "no prompts"],
)
def test_submit_batch_refuses_bad_input_and_queues_nothing(
    healthy_fleet: LocalFleet, published: Published, args: list[str], message: str
) -> None:
    out = manage("submit_batch", *args)
    assert out.returncode != 0 and message in out.stderr, out
    assert out.stdout == ""
    sentinel = infer.delay(model=MODEL, prompt="after the command", tier="batch")
    assert set(published.until(sentinel.id)) == {sentinel.id}
    assert sentinel.get(timeout=60).routing.instance in healthy_fleet.sim_urls
