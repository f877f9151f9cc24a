"""Corral's Celery app, configured from Django's settings (cookiecutter-django's shape).

The project has no Celery app of its own: ``tasks.infer`` is bound to Corral's, and a second
app would publish with other settings. ``configure_from`` is ``config_from_object`` that
keeps what every Corral process needs (priority queues, late acks, JSON, the broker).
"""

import os

# Before the app is created, as in cookiecutter-django: the `celery` command does not go
# through manage.py, and Celery installs its Django fix-up (tasks of INSTALLED_APPS, database
# connections in workers) only when this is set.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from app.celery_app import celery_app as app
from app.celery_app import configure_from

configure_from("django.conf:settings", namespace="CELERY", app=app)
app.autodiscover_tasks()
