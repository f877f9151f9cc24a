"""The example project's configuration.

Imported by Django before anything else, so Corral's Celery app is configured from this
project's settings in every process: the web server, management commands, a celery worker.
"""

from config.celery_app import app as celery_app

__all__ = ("celery_app",)
