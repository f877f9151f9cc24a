"""Malformed requests thrown at ``infer.delay()`` and at the workers (property-based).

Whatever the fields, a request that does not validate raises ``InvalidRequest`` at the call
(no other exception) and publishes nothing; one sent by name past the client's check fails
as a typed error in the router, and the workers stay up.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.signals import before_task_publish
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.bench.harness import LocalFleet
from app.celery_app import celery_app
from app.errors import InvalidRequest
from app.queues import route_queue
from app.schemas import InferRequest
from tasks import infer

pytestmark = pytest.mark.fleet

CHAT = "llama3.2:3b"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text()
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner)
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["generate", "chat", "embed", "Chat", "", "edit"]) | scalars,
        "model": st.sampled_from([CHAT, "nomic-embed-text", "", "no/such:model"]) | scalars,
        "prompt": st.text() | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {}, optional={"role": st.text() | scalars, "content": st.text() | scalars}
            )
        )
        | json_values,
        "input": st.lists(st.text(), max_size=3) | json_values,
        "tier": st.sampled_from(["interactive", "normal", "batch", "urgent"]) | scalars,
        "priority": st.integers(-3, 12) | scalars,
        "options": st.dictionaries(
            st.sampled_from(["temperature", "num_predict", "seed", "top_k", "tempreature"]),
            json_values,
        )
        | json_values,
        "cache": json_values,
        "stream": json_values,
    },
)


def _invalid(request: dict[str, Any]) -> bool:
    try:
        InferRequest.model_validate(request)
    except (ValidationError, ValueError, TypeError):
        return True
    return False


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=fields)
def test_any_malformed_request_raises_invalid_request_and_publishes_nothing(
    healthy_fleet: LocalFleet, request: dict[str, Any]
) -> None:
    assume(_invalid(request))
    published: list[Any] = []

    def record(**kwargs: Any) -> None:
        published.append(kwargs)

    before_task_publish.connect(record, weak=False)
    try:
        with pytest.raises(InvalidRequest) as info:
            infer.delay(**request)
    finally:
        before_task_publish.disconnect(record)
    assert published == []
    assert str(info.value).strip()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=fields)
def test_malformed_jobs_sent_by_name_fail_typed_and_workers_stay_up(
    healthy_fleet: LocalFleet, request: dict[str, Any]
) -> None:
    assume(_invalid(request))
    job = celery_app.send_task(
        "corral.infer", kwargs=request, queue=route_queue(CHAT, "normal"), priority=5
    )
    with pytest.raises(InvalidRequest):
        job.get(timeout=30)
    assert all(child.alive() for child in healthy_fleet.procs.values())
