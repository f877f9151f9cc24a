"""Submitting many jobs at once (``infer.submit_many``) on the session's real fleet: a result
per request, in order; all or none (an invalid request, a model nobody serves, the refusing
degradation level, a refusing rate limit: nothing queued, the item named); fairness and
idempotency as for ``infer.delay``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import before_task_publish
from kombu import Producer

from app.bench.harness import LocalFleet, wait_until
from app.errors import BrokerUnavailable, InvalidRequest, ModelNotServed, Overloaded, RateLimited
from app.fleet.policy_admin import PolicyAdmin
from app.fleet.policy_store import PolicyStore
from app.jobs import publish
from app.policy.degradation import degradation
from app.policy.live import READ_TTL
from app.policy.live import publish as publish_policy
from app.settings import get_settings
from app.state import keys
from app.state.fleet import fleet_state
from tasks import infer

CHAT = "llama3.2:3b"
EMBED = "nomic-embed-text"
PID = os.getpid()

pytestmark = pytest.mark.fleet


def _gen(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": CHAT, "prompt": f"bulk {i}", "options": {"num_predict": i % 5 + 1}, **extra}


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The bodies' keyword arguments of every job published meanwhile, in order."""
    sent: list[dict[str, Any]] = []

    def record(body: Any = None, **_: Any) -> None:
        sent.append(body[1])

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


def _served(fleet: LocalFleet) -> int:
    return sum(fleet.sim_stats(name)["requests_total"] for name in fleet.sim_urls)


def test_a_bulk_call_gives_a_result_per_request_in_order(
    healthy_fleet: LocalFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of 7 jobs: 60 jobs take 9 chunks, each confirmed before the next is sent.
    monkeypatch.setattr(publish, "CHUNK", 7)
    requests: list[dict[str, Any]] = [
        _gen(i, tier=("interactive", "normal", "batch")[i % 3], cache=False) for i in range(57)
    ]
    requests += [
        {"model": CHAT, "kind": "chat", "messages": [{"role": "user", "content": "hi"}]},
        {"model": EMBED, "kind": "embed", "input": ["a", "b"], "cache": False},
        {"model": CHAT, "prompt": "last", "tier": "interactive", "cache": False},
    ]
    sent = infer.submit_many(requests)
    assert len(sent) == 60 and len({r.id for r in sent}) == 60
    results = [r.get(timeout=120) for r in sent]
    assert [r.id for r in results] == [r.id for r in sent]
    assert [r.completion_tokens for r in results[:57]] == [i % 5 + 1 for i in range(57)]
    assert [r.kind for r in results[57:]] == ["chat", "embed", "generate"]
    assert results[57].message and results[58].embeddings and len(results[58].embeddings) == 2
    assert _served(healthy_fleet) == 60  # each ran once


def test_one_invalid_request_refuses_the_whole_call_and_names_it(
    healthy_fleet: LocalFleet, published: list[dict[str, Any]]
) -> None:
    agent = f"bulk-invalid-{PID}"
    requests: list[Any] = [_gen(i, agent=agent) for i in range(20)]
    requests[7] = {"model": CHAT, "agent": agent}  # no prompt
    requests[12] = _gen(12, tier="urgent")
    requests[15] = "not a request"
    with pytest.raises(InvalidRequest) as info:
        infer.submit_many(requests)
    assert info.value.item == 7
    text = str(info.value)
    assert text.startswith("item 7: invalid infer request:") and "needs 'prompt'" in text, text
    assert "also invalid: items 12, 15" in text and "nothing was queued" in text
    with pytest.raises(InvalidRequest, match="item 0: _route is Corral's own"):
        infer.submit_many([{**_gen(0), "_route": {}}, _gen(1)])
    assert published == []
    assert fleet_state().fairness.outstanding("normal", agent) == 0  # nothing counted


def test_a_model_nobody_serves_refuses_the_whole_call(
    healthy_fleet: LocalFleet, published: list[dict[str, Any]]
) -> None:
    requests = [_gen(0), _gen(1), {**_gen(2), "model": "nobody-serves:this"}, _gen(3)]
    with pytest.raises(ModelNotServed, match=r"^item 2: no instance serves model") as info:
        infer.submit_many(requests)
    assert info.value.item == 2 and published == []


@pytest.fixture
def pinned(healthy_fleet: LocalFleet) -> Iterator[LocalFleet]:
    yield healthy_fleet
    degradation().pin(None)


def test_at_the_refusing_level_a_bulk_call_with_a_normal_job_is_refused_whole(
    pinned: LocalFleet, published: list[dict[str, Any]]
) -> None:
    degradation().pin(3)
    time.sleep(READ_TTL + 0.2)  # every process rereads the level within READ_TTL
    mixed = [_gen(0, tier="interactive"), _gen(1, tier="batch"), _gen(2), _gen(3)]
    with pytest.raises(Overloaded, match=r"^item 2: Corral is overloaded") as info:
        infer.submit_many(mixed)
    assert info.value.item == 2 and info.value.retry_after > 0 and published == []
    # Interactive and batch jobs are still taken, as one by one.
    taken = infer.submit_many([_gen(0, tier="interactive"), _gen(1, tier="batch")])
    assert [r.get(timeout=30).completion_tokens for r in taken] == [1, 2]


@pytest.fixture
def refusing_class(healthy_fleet: LocalFleet) -> Iterator[str]:
    """A class of this session's own that refuses over 30 jobs a minute (a burst of 5), set
    live; its name is also its agents' prefix."""
    name = f"bulkstrict{PID}"
    PolicyAdmin(PolicyStore()).set(
        name, agents=[f"{name}-*"], rate_per_minute=30, on_limit="refuse"
    )
    time.sleep(READ_TTL + 0.3)  # this process's copy of the policy is at most this old
    yield name
    store = PolicyStore()
    if store.remove(name):
        publish_policy(store.load())
    redis = fleet_state().redis
    for key in redis.scan_iter(keys.rate_all(get_settings().namespace)):
        if name in key:
            redis.delete(key)


def test_a_refusing_class_takes_a_bulk_calls_tokens_all_at_once_or_none(
    refusing_class: str, published: list[dict[str, Any]]
) -> None:
    agent = f"{refusing_class}-1"
    # Another agent's job too: a job of a class that does not refuse takes no token here.
    first = infer.submit_many(
        [_gen(0, agent="someone-else"), *[_gen(i, agent=agent) for i in (1, 2, 3)]]
    )
    assert len(published) == 4
    # 2 tokens left of 5: a call of 4 of the class is refused whole, naming its first job of
    # the class, and takes nothing.
    with pytest.raises(RateLimited, match="take their tokens at once, or none: retry in") as info:
        infer.submit_many([_gen(4), *[_gen(i, agent=agent) for i in (5, 6, 7, 8)]])
    assert info.value.item == 1 and 3 < info.value.retry_after <= 4.1
    assert len(published) == 4
    second = infer.submit_many([_gen(5, agent=agent), _gen(6, agent=agent)])  # the 2 left
    # More jobs than the bucket ever holds: never at once, so the caller is told to split.
    with pytest.raises(RateLimited, match="it holds at most 5: split the call") as never:
        infer.submit_many([_gen(i, agent=f"{refusing_class}-2") for i in range(6)])
    assert never.value.item == 0 and never.value.retry_after == pytest.approx(10)
    assert len(published) == 6
    assert len({r.get(timeout=30).id for r in first + second}) == 6


def test_fairness_counts_a_bulk_call_as_one_by_one(
    healthy_fleet: LocalFleet, published: list[dict[str, Any]]
) -> None:
    hog, mouse = f"bulk-hog-{PID}", f"bulk-mouse-{PID}"
    requests = [_gen(i, agent=hog, cache=False) for i in range(9)]
    requests.insert(4, _gen(99, agent=mouse, cache=False))
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)  # the jobs are still outstanding below
    try:
        sent = infer.submit_many(requests)
        assert fleet_state().fairness.outstanding("normal", hog) == 9
        assert fleet_state().fairness.outstanding("normal", mouse) == 1
    finally:
        healthy_fleet.clear_faults()
    # What infer.delay gives the 1st, 2nd, ... job of an agent (tests/test_fairness.py).
    priorities = [body["_route"]["priority"] for body in published]
    assert priorities == [5, 4, 4, 3, 5, 3, 3, 3, 2, 2]
    for r in sent:
        r.get(timeout=60)
    # Each leaves the count when it ends.
    wait_until(
        lambda: fleet_state().fairness.outstanding("normal", hog) == 0, 10, "hog's jobs uncounted"
    )


def test_job_keys_in_a_bulk_call_answer_with_the_first_job(healthy_fleet: LocalFleet) -> None:
    key, again = f"bulk-key-{time.time()}", f"bulk-again-{time.time()}"
    earlier = infer.delay(**_gen(0, cache=False), job_key=again)
    sent = infer.submit_many(
        [
            _gen(1, job_key=key, cache=False),
            _gen(2, cache=False),
            _gen(3, job_key=key, cache=False),  # the same key twice in one call
            _gen(4, job_key=again, cache=False),  # bound by an earlier call
        ]
    )
    assert sent[2].id == sent[0].id and sent[3].id == earlier.id
    assert len({r.id for r in sent}) == 3
    assert [r.get(timeout=30).completion_tokens for r in sent] == [2, 3, 2, 1]
    assert _served(healthy_fleet) == 3


def test_jobs_the_broker_does_not_take_raise_broker_unavailable_and_give_back_their_key(
    healthy_fleet: LocalFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every publish fails as on a connection the broker dropped: kombu's retries on new
    connections are spent, the call raises BrokerUnavailable, and what the checks took for
    the jobs is given back, so the same calls made again run."""
    key, bulk_key, agent = (f"{w}-{time.time()}" for w in ("refused", "bulk-refused", "refused"))
    served = _served(healthy_fleet)

    def dropped(*_: Any, **__: Any) -> None:
        raise ConnectionResetError("the broker dropped the connection (test)")

    with monkeypatch.context() as m:
        m.setattr(Producer, "_publish", dropped)
        with pytest.raises(BrokerUnavailable, match="retry"):
            infer.delay(**_gen(1, cache=False), job_key=key, agent=agent)
        with pytest.raises(BrokerUnavailable) as refused:
            infer.submit_many([_gen(2, job_key=bulk_key, agent=agent, cache=False)])
        assert refused.value.queued == ()
    assert fleet_state().fairness.outstanding("normal", agent) == 0
    again = [
        infer.delay(**_gen(1, cache=False), job_key=key, agent=agent),
        *infer.submit_many([_gen(2, job_key=bulk_key, agent=agent, cache=False)]),
    ]
    assert [r.get(timeout=30).completion_tokens for r in again] == [2, 3]
    assert _served(healthy_fleet) == served + 2
