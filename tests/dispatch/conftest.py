"""pytest-celery against this machine's RabbitMQ and Redis instead of containers.

Its broker and backend clusters are replaced by the local services and its worker cluster by
nothing: the workers are the real `celery worker` processes of the ``fleet`` fixture.
"""

from __future__ import annotations

import pytest
from celery import Celery
from pytest_celery import CeleryTestSetup
from pytest_celery.fixtures.setup import (  # noqa: F401 (fixtures used by the tests)
    celery_setup,
    celery_setup_app,
    celery_setup_config,
    celery_setup_name,
)

from app.queues import MAX_PRIORITY
from app.settings import get_settings


class LocalServicesSetup(CeleryTestSetup):
    @classmethod
    def update_app_config(cls, app: Celery) -> None:
        # Queues are declared with the same arguments everywhere (see app.celery_app).
        app.conf.task_queue_max_priority = MAX_PRIORITY


@pytest.fixture
def celery_setup_cls() -> type[CeleryTestSetup]:
    return LocalServicesSetup


@pytest.fixture
def celery_worker_cluster() -> None:
    return None  # the workers are the fleet's real subprocesses


@pytest.fixture
def celery_broker_cluster() -> None:
    return None


@pytest.fixture
def celery_backend_cluster() -> None:
    return None


@pytest.fixture
def celery_worker_cluster_config() -> dict:
    s = get_settings()
    return {
        "celery_broker_cluster_config": {"host_urls": [s.broker_url]},
        "celery_backend_cluster_config": {"host_urls": [s.result_backend]},
    }
