"""Malformed bodies thrown at the gateway's inference endpoints (property-based).

Every one gets a 4xx with a JSON error body (or, if it happens to be valid, an answer),
never a 5xx or a hang.
"""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.bench.harness import LocalFleet
from tests.gateway.conftest import Gateway

pytestmark = pytest.mark.fleet

PATHS = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/jobs",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=False), st.text()
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner)
)
bodies = st.one_of(
    # Near misses of real requests: the fields clients send, with wrong types or values.
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["llama3.2:3b", "nomic-embed-text", "", "nope"]) | scalars,
            "prompt": json_values,
            "messages": json_values,
            "input": json_values,
            "options": json_values,
            "stream": st.just(False) | json_values,
            "max_tokens": json_values,
            "temperature": json_values,
            "n": json_values,
        },
    ).map(json.dumps),
    json_values.map(json.dumps),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),  # not JSON at all
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(PATHS), body=bodies)
def test_malformed_bodies_get_a_4xx_with_a_json_error(
    gateway: Gateway, healthy_fleet: LocalFleet, path: str, body: str
) -> None:
    reply = requests.post(
        gateway.url + path,
        data=body.encode(),
        headers={**gateway.auth(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code < 500, (path, body, reply.status_code, reply.text[:300])
    if reply.status_code >= 400:
        assert "error" in reply.json(), (path, body, reply.text[:300])
