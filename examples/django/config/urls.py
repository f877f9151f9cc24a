from django.urls import path
from jobs import views

urlpatterns = [
    path("jobs", views.submit),
    # A job id is a UUID: anything else is a 404 here, before Celery is asked.
    path("jobs/<uuid:job_id>", views.poll),
]
