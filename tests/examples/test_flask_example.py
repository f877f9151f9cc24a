"""examples/flask, run as a person runs it (``flask --app ... run``) against the session's
simulated fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from app.bench.harness import LocalFleet
from app.queues import route_queue
from app.settings import get_settings
from tests.examples.conftest import EXAMPLES, Published, Server

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
GOOD = {"model": MODEL, "prompt": "Why is the sky blue?", "tier": "interactive"}


def test_job_submitted_over_http_runs_on_the_fleet(
    healthy_fleet: LocalFleet, flask_server: Server, published: Published
) -> None:
    answer = flask_server.submit({**GOOD, "tier": "normal", "agent": "flask-example"})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert published.until(job_id)[job_id] == route_queue(MODEL, "normal")

    view = flask_server.finished(job_id)
    assert view["state"] == "SUCCESS", view
    result = view["result"]
    assert result["id"] == job_id and result["kind"] == "generate" and result["text"]
    instance = result["routing"]["instance"]
    assert instance in healthy_fleet.sim_urls
    assert healthy_fleet.sim_stats(instance)["models"][MODEL]["requests"] >= 1


def test_embed_job_returns_its_vectors(healthy_fleet: LocalFleet, flask_server: Server) -> None:
    body = {"model": "nomic-embed-text", "kind": "embed", "input": ["a", "b"]}
    answer = flask_server.submit(body)
    assert answer.status_code == 202, answer.text
    view = flask_server.finished(answer.json()["id"])
    assert view["state"] == "SUCCESS", view
    assert len(view["result"]["embeddings"]) == 2
    assert view["result"]["routing"]["instance"] in healthy_fleet.sim_urls


def test_bad_input_is_a_400_and_queues_nothing(
    healthy_fleet: LocalFleet,
    flask_server: Server,
    published: Published,
    bad_request: tuple[object, str],
) -> None:
    body, message = bad_request
    answer = flask_server.submit(body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]
    # A good job published after it is seen; nothing was published before it.
    sentinel = flask_server.submit(GOOD).json()["id"]
    assert set(published.until(sentinel)) == {sentinel}
    assert flask_server.finished(sentinel)["state"] == "SUCCESS"


def test_failed_job_polls_as_its_typed_error(
    healthy_fleet: LocalFleet, flask_server: Server
) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    job_id = flask_server.submit(GOOD).json()["id"]
    view = flask_server.finished(job_id)
    assert view["state"] == "FAILURE", view
    error = view["error"]
    assert error["type"] == "RetriesExhausted" and "result" not in view
    assert {h["instance"] for h in error["history"]} == set(healthy_fleet.sim_urls)


def test_unknown_job_is_pending_and_a_malformed_id_is_404(flask_server: Server) -> None:
    never_submitted = str(uuid.uuid4())
    answer = flask_server.poll(never_submitted)
    assert answer.status_code == 200
    assert answer.json() == {"id": never_submitted, "state": "PENDING"}
    assert flask_server.poll("not-a-job-id").status_code == 404


def test_celery_app_is_configured_from_flask_config_keeping_corrals() -> None:
    code = (
        "import json; from corral_flask import create_app; from tasks import infer;"
        " flask_app = create_app(); app = flask_app.extensions['celery']; c = app.conf;"
        " print(json.dumps({'same_app': infer.app is app, 'max_retries':"
        " c.result_backend_max_retries, 'priority': c.task_queue_max_priority,"
        " 'acks_late': c.task_acks_late, 'prefetch': c.worker_prefetch_multiplier,"
        " 'serializer': c.task_serializer, 'options': c.broker_transport_options,"
        " 'broker': c.broker_url, 'default_queue': c.task_default_queue}))"
    )
    # A broker of the Flask docs' example, through Flask's prefixed environment: ignored.
    env = dict(os.environ, FLASK_CELERY__broker_url='"redis://elsewhere:6379/0"')
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=EXAMPLES / "flask",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    settings = get_settings()
    assert json.loads(out.stdout) == {
        "same_app": True,
        "max_retries": 3,  # from the Flask config
        "priority": 9,  # the rest is Corral's
        "acks_late": True,
        "prefetch": 1,
        "serializer": "json",
        "options": {"confirm_publish": True},
        "broker": settings.broker_url,
        "default_queue": f"{settings.namespace}.default",
    }
    assert "broker_url='redis://elsewhere:6379/0' is ignored" in out.stderr
