"""An app that does not import Corral dispatches jobs by task name.

This is the shape of a Django or Flask project with a Celery app of its own: here the client
app is pytest-celery's setup app (see conftest.py), configured with nothing of Corral's but
the broker, the backend and the queue priority argument.
"""

from __future__ import annotations

import pytest
from pytest_celery import CeleryTestSetup

from app.bench.harness import LocalFleet
from app.queues import route_queue
from app.settings import get_settings

pytestmark = pytest.mark.fleet


def test_foreign_app_dispatches_infer_by_name(
    healthy_fleet: LocalFleet, celery_setup: CeleryTestSetup
) -> None:
    app = celery_setup.app
    assert app.main != "corral" and app.conf.broker_url == get_settings().broker_url
    result = app.send_task(
        "corral.infer",
        kwargs={"model": "llama3.2:3b", "prompt": "from another app", "tier": "interactive"},
        queue=route_queue("llama3.2:3b", "interactive"),
        priority=5,
    )
    out = result.get(timeout=30)
    assert out["id"] == result.id and out["text"]
    assert out["routing"]["instance"] in healthy_fleet.sim_urls


def test_foreign_app_gets_the_validation_error(
    healthy_fleet: LocalFleet, celery_setup: CeleryTestSetup
) -> None:
    from app.errors import InvalidRequest

    result = celery_setup.app.send_task(
        "corral.infer",
        kwargs={"model": "llama3.2:3b", "kind": "chat"},
        queue=route_queue("llama3.2:3b", "normal"),
    )
    with pytest.raises(InvalidRequest, match="needs 'messages'"):
        result.get(timeout=30)
