"""``app.celery_app.configure_from``: a framework's Celery settings over Corral's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.celery_app import REQUIRED_SETTINGS, celery_config, configure_from, create_app
from app.settings import get_settings

#: Django settings as cookiecutter-django writes them, with some Corral cannot accept.
DJANGO = SimpleNamespace(
    DEBUG=True,
    CELERY_TIMEZONE="Europe/Paris",
    CELERY_BROKER_HEARTBEAT=30,
    CELERY_RESULT_EXTENDED=True,
    CELERY_ACCEPT_CONTENT=("json",),
    CELERY_TASK_ACKS_LATE=False,
    CELERY_BROKER_URL="redis://elsewhere:6379/0",
    CELERY_BROKER_TRANSPORT_OPTIONS={"max_retries": 3, "confirm_publish": False},
)


def test_config_from_object_alone_drops_corrals_settings() -> None:
    """Why configure_from exists: Celery replaces the configuration source."""
    app = create_app()
    app.config_from_object(DJANGO, namespace="CELERY")
    assert app.conf.task_queue_max_priority is None
    assert app.conf.task_acks_late is False


def test_framework_settings_apply_over_corrals_but_not_the_required_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = configure_from(DJANGO, namespace="CELERY", app=create_app())
    conf = app.conf
    # The framework's own, and its values of Corral's other settings.
    assert conf.timezone == "Europe/Paris"
    assert conf.broker_heartbeat == 30 and conf.result_extended is True
    # Corral's required settings, whatever the framework says.
    corral = celery_config(get_settings())
    plain = REQUIRED_SETTINGS - {"broker_transport_options"}
    assert {key: conf[key] for key in plain} == {key: corral[key] for key in plain}
    assert conf.broker_transport_options == {"max_retries": 3, "confirm_publish": True}
    # Settings the framework leaves alone stay Corral's.
    assert conf.task_default_queue == corral["task_default_queue"]
    # Each ignored value is named, with the framework's spelling.
    warned = caplog.text
    assert "CELERY_TASK_ACKS_LATE=False is ignored" in warned
    assert "CELERY_BROKER_URL='redis://elsewhere:6379/0' is ignored" in warned
    assert "CELERY_BROKER_TRANSPORT_OPTIONS['confirm_publish']=False is ignored" in warned
    assert "ACCEPT_CONTENT" not in warned  # the same value, spelt as a tuple


def test_an_app_already_configured_is_reconfigured_at_once() -> None:
    app = create_app()
    assert app.conf.timezone is None  # configured from Corral's settings alone
    configure_from({"timezone": "Europe/Paris", "task_serializer": "pickle"}, app=app)
    assert app.conf.timezone == "Europe/Paris"
    assert app.conf.task_serializer == "json"
    assert app.conf.task_queue_max_priority == 9
