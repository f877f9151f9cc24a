"""Flower, started for real with Corral's config, watching real jobs of the shared fleet."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import requests

from app.bench.harness import LocalFleet, wait_until
from app.errors import RetriesExhausted
from app.queues import batch_queue, dead_letter_queue, instance_queue, route_queue
from app.settings import TIERS
from tasks import infer

pytestmark = pytest.mark.fleet

CHAT = "llama3.2:3b"
EMBED = "nomic-embed-text:latest"
LONG_PROMPT = "Tell me everything about the sky. " * 40


def task_info(flower: Any, job_id: str) -> dict[str, Any] | None:
    response = flower.api(f"/api/task/info/{job_id}")
    return response.json() if response.ok else None


def finished(flower: Any, job_id: str, state: str) -> dict[str, Any] | None:
    info = task_info(flower, job_id)
    return info if info and info.get("state") == state else None


@pytest.fixture(scope="module")
def watching(flower: Any, fleet: LocalFleet) -> Any:
    """Flower once its event consumer is live: it has seen a job that ran after it started.

    Its HTTP server answers before its event consumer is connected, and events sent before
    that are gone, so a job is submitted until one shows up (bounded).
    """
    deadline = time.time() + 60
    while time.time() < deadline:
        job = infer.delay(model=CHAT, prompt="warm up")
        job.get(timeout=30)
        seen = time.time() + 3
        while time.time() < seen:
            if task_info(flower, job.id):
                return flower
            time.sleep(0.2)
    raise TimeoutError("Flower showed none of the jobs run in 60 s")


def test_broker_tab_lists_every_corral_queue_first_thing(
    flower: Any, healthy_fleet: LocalFleet, browser: Any
) -> None:
    """What a new user opens first (the README's tour): before anything has asked Flower
    about its workers, the Broker tab lists Corral's queues, the dead-letter queue (which no
    worker consumes) included."""
    from selenium.webdriver.common.by import By

    for name in healthy_fleet.sim_urls:  # a job in the dead-letter queue, so that it exists
        healthy_fleet.faults(name, error_rate=1.0)
    with pytest.raises(RetriesExhausted):
        infer.delay(model=CHAT, prompt="to the dead-letter queue").get(timeout=60)
    expected = {
        *(instance_queue(n) for n in healthy_fleet.sim_urls),
        *(route_queue(m, t) for m in (CHAT, EMBED) for t in TIERS),
        batch_queue(),
        dead_letter_queue(),
    }
    token = base64.b64encode(":".join(flower.auth).encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
    )

    def listed() -> set[str] | None:
        browser.get(flower.url + "/broker")
        cells = browser.find_elements(By.CSS_SELECTOR, "#queue-table tbody tr td:first-child")
        names = {c.text for c in cells}
        return names if expected <= names else None

    try:
        wait_until(listed, 20, "Corral's queues in the Broker tab", every=1.0)
    except TimeoutError:
        shown = browser.find_element(By.ID, "queue-table").text
        raise AssertionError(f"the Broker tab lists only:\n{shown}") from None


def test_api_refuses_requests_without_the_right_credentials(flower: Any) -> None:
    for path in ("/api/tasks", "/api/workers", "/api/queues/length", "/api/task/info/x"):
        assert requests.get(flower.url + path, timeout=10).status_code == 401, path
        wrong = requests.get(flower.url + path, auth=("ops", "wrong"), timeout=10)
        assert wrong.status_code == 401, path
    assert flower.api("/api/tasks", limit=1).status_code == 200


def test_metrics_and_healthcheck_are_open_as_documented(flower: Any) -> None:
    # Flower exempts these from auth; the README says to keep Flower on a private network.
    assert requests.get(flower.url + "/healthcheck", timeout=10).status_code == 200
    assert requests.get(flower.url + "/metrics", timeout=10).status_code == 200


def test_jobs_appear_with_their_states_and_shortened_kwargs(
    watching: Any, healthy_fleet: LocalFleet
) -> None:
    ok = infer.delay(model=CHAT, prompt=LONG_PROMPT, agent="flower-test")
    result = ok.get(timeout=30)
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    failed = infer.delay(model=CHAT, prompt="fails everywhere")
    with pytest.raises(RetriesExhausted):
        failed.get(timeout=60)

    info = wait_until(lambda: finished(watching, ok.id, "SUCCESS"), 15, "the job's success")
    assert info["name"] == "corral.infer"
    # The instance worker ran it and reported it; the router stage sends no events.
    assert info["worker"].split("@")[0].endswith(result.routing.instance)
    kwargs = info["kwargs"]
    assert "flower-test" in kwargs and CHAT in kwargs
    assert LONG_PROMPT not in kwargs and "..." in kwargs and len(kwargs) < len(LONG_PROMPT)
    assert "_route" not in kwargs

    bad = wait_until(lambda: finished(watching, failed.id, "FAILURE"), 15, "the job's failure")
    assert "RetriesExhausted" in bad["exception"]

    listed = watching.api("/api/tasks", taskname="corral.infer", limit=5000).json()
    assert listed[ok.id]["state"] == "SUCCESS"
    assert listed[failed.id]["state"] == "FAILURE"
    assert watching.api("/api/tasks", state="FAILURE", limit=5000).json().get(failed.id)


def test_queues_are_visible_through_the_broker_api(flower: Any, healthy_fleet: LocalFleet) -> None:
    # Flower lists the queues its workers consume (from inspect): refresh that first.
    assert flower.api("/api/workers", refresh=1).status_code == 200
    ours = {instance_queue(n) for n in healthy_fleet.sim_urls} | {
        route_queue(CHAT, t) for t in ("interactive", "normal", "batch")
    }

    def lengths() -> dict[str, int | None] | None:
        response = flower.api("/api/queues/length")
        if not response.ok:
            return None
        # A new queue has no message counts until RabbitMQ's next stats sample (5 s).
        queues = {q["name"]: q.get("messages") for q in response.json()["active_queues"]}
        return queues if all(isinstance(queues.get(q), int) for q in ours) else None

    wait_until(lengths, 30, "Flower to list the fleet's queues with lengths", every=1.0)


@pytest.mark.parametrize("terminate", [False, True])
def test_flowers_revoke_button_stops_a_running_job(
    flower: Any, healthy_fleet: LocalFleet, terminate: bool
) -> None:
    """Flower's revoke (and its terminate, which the threads pool cannot do) is Celery's
    revoke broadcast: the instance worker closes the call, and the server stops generating."""
    from celery.exceptions import TaskRevokedError

    from app.gateway.jobs import place

    job = infer.delay(model=CHAT, prompt="revoke me from Flower", options={"num_predict": 2000})
    wait_until(lambda: place(job.id, CHAT) == "running", 10, "the job to start")
    time.sleep(0.3)
    button = requests.post(
        f"{flower.url}/api/task/revoke/{job.id}",
        params={"terminate": str(terminate).lower()},
        auth=flower.auth,
        timeout=10,
    )
    assert button.status_code == 200, button.text
    with pytest.raises(TaskRevokedError):
        job.get(timeout=5)

    def cancelled() -> int:
        return sum(healthy_fleet.sim_stats(n)["cancelled_total"] for n in healthy_fleet.sim_urls)

    wait_until(lambda: cancelled() == 1, 3, "the server to see the call closed")
    assert sum(healthy_fleet.sim_stats(n)["requests_total"] for n in healthy_fleet.sim_urls) == 1
