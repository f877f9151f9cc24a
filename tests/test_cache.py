"""The response cache's single flight against real Redis, without a broker."""

from __future__ import annotations

import time
import uuid

import pytest

from app.jobs import lifecycle
from app.jobs.cache import ResponseCache, response_cache
from app.schemas import InferRequest, InferResult, RouteState


def test_a_claim_won_just_after_the_leader_stored_its_answer_uses_that_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leader stores its answer and drops its claim between a duplicate's look-up and its
    claim: the duplicate must take the stored answer, not compute it again."""
    request = InferRequest(model="m", kind="embed", input=[f"race {uuid.uuid4()}"])
    digest = request.cache_key()
    cache = response_cache()
    assert cache.claim(digest, "leader", 60) == "leader"
    answer = InferResult(id="leader", kind="embed", model="m", embeddings=[[0.5]]).model_dump(
        mode="json"
    )

    look_ups = 0
    real_get = ResponseCache.get

    def leader_finishes_after_first_look_up(self: ResponseCache, key: str) -> dict | None:
        nonlocal look_ups
        look_ups += 1
        if look_ups == 1:
            cache.put(digest, answer, "leader")  # stores and releases the claim
            return None
        return real_get(self, key)

    monkeypatch.setattr(ResponseCache, "get", leader_finishes_after_first_look_up)
    out = lifecycle._from_cache("duplicate", request, RouteState(submitted_at=time.time()))

    assert out is not None and out["routing"]["cache_hit"] and out["id"] == "duplicate"
    assert out["embeddings"] == [[0.5]]
    assert not cache.redis.exists(cache._flight(digest)), "the duplicate kept a claim"
