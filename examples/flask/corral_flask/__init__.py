"""A Flask app that submits Corral jobs and polls them.

    .venv/bin/flask --app examples/flask/corral_flask run

Celery is set up with the Flask docs' ``celery_init_app`` pattern, bound to Corral's one app.
"""

from celery import Celery
from flask import Flask

from app.celery_app import celery_app, configure_from
from corral_flask.views import jobs


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        # Read over Corral's own settings by celery_init_app. Where the broker and the result
        # backend are is not set here: every Corral process reads it from CORRAL_BROKER_URL
        # and CORRAL_RESULT_BACKEND (a broker_url that differs is ignored, with a warning).
        CELERY={
            # Corral retries the result backend without limit, right for workers; a request
            # polling a job should fail after a few tries while Redis is down, not hang.
            "result_backend_max_retries": 3,
        },
    )
    app.config.from_prefixed_env()
    celery_init_app(app)
    app.register_blueprint(jobs)
    return app


def celery_init_app(app: Flask) -> Celery:
    """Configure Corral's Celery app from ``app.config["CELERY"]`` and bind it to ``app``.

    The Flask docs create ``Celery(app.name, task_cls=FlaskTask)`` here. This app uses
    Corral's instead, to which ``tasks.infer`` is bound, and needs no Flask task class:
    ``infer`` runs in Corral's workers, not in this app.
    """
    configure_from(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
