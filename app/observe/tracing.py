"""OpenTelemetry tracing, off unless ``CORRAL_TRACING=true``.

One trace per job: the gateway's request (FastAPI instrumentation), the publish and each
Celery stage (Celery instrumentation carries the context in the message headers, through
``Task.replace`` and retries), and Corral's own spans: ``corral.route`` (waiting for and
reserving a slot), ``corral.queue_wait`` (from submission until an instance worker starts
the job) and ``ollama.<kind>`` around the call, whose HTTP request is a child span
(requests instrumentation). Spans go over OTLP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the SDK's
standard variables), or to JSON-lines files under ``CORRAL_TRACING_DIR``.

When tracing is off, ``tracer`` is OpenTelemetry's no-op tracer: the spans in the code cost
next to nothing.
"""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry import trace

from app.settings import get_settings

tracer = trace.get_tracer("corral")

_done = False


def setup(service: str) -> None:
    """Install the tracer provider and the instrumentations, once per process."""
    global _done
    settings = get_settings()
    if _done or not settings.tracing:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    if settings.tracing_dir is not None:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        settings.tracing_dir.mkdir(parents=True, exist_ok=True)
        out = (settings.tracing_dir / f"{service}-{os.getpid()}.jsonl").open("a", buffering=1)
        exporter = ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": f"corral-{service}"}))
    # A short delay: a worker killed between jobs loses at most a second of spans.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    RequestsInstrumentor().instrument()
    _done = True


def instrument_app(app: Any) -> None:
    """The gateway's FastAPI app, when tracing is on."""
    if get_settings().tracing:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app)


def record_queue_wait(submitted_at: float, **attributes: Any) -> None:
    """A span for the time a job spent queued and waiting for a slot, ending now."""
    span = tracer.start_span(
        "corral.queue_wait", start_time=int(submitted_at * 1e9), attributes=attributes
    )
    span.end(end_time=time.time_ns())
