"""Settings of the example project: two JSON endpoints and a management command.

There is no database: jobs live in RabbitMQ and their results in Redis, both Corral's.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["jobs"]
ROOT_URLCONF = "config.urls"
USE_TZ = True
TIME_ZONE = "UTC"

# Celery, read by config/celery_app.py over Corral's own settings. Where the broker and the
# result backend are is not set here: every Corral process reads it from CORRAL_BROKER_URL
# and CORRAL_RESULT_BACKEND (a CELERY_BROKER_URL that differs is ignored, with a warning).
CELERY_TIMEZONE = TIME_ZONE
# Corral retries the result backend without limit, right for workers; a web request polling
# a job should fail after a few tries while Redis is down, not hang.
CELERY_RESULT_BACKEND_MAX_RETRIES = 3
