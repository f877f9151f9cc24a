"""Batched embeddings (app.jobs.embed_batch), end to end on the shared fleet: real RabbitMQ,
Redis, simulators and worker processes.

The simulators' embed calls are slowed (``slow_factor``) so that jobs have to wait for a slot,
which is when they ride in another job's call; with an idle fleet every job runs alone.
"""

from __future__ import annotations

import time

import pytest
import requests

from app.bench.harness import LocalFleet, results_of, wait_until
from app.errors import JobRejected
from tasks import infer

pytestmark = pytest.mark.fleet

EMBED = "nomic-embed-text"


#: The embed call's fixed cost (2 ms by default in the simulator) becomes 200 ms, each input's
#: (its words at 2,000 a second here) 2.5 ms a word.
SLOW = 100.0


def direct_vector(fleet: LocalFleet, text: str, **fields: object) -> list[float]:
    """The vector of ``text`` from one simulator, in a call of its own (unbatched)."""
    url = next(iter(fleet.sim_urls.values()))
    body = {"model": EMBED, "input": [text], **fields}
    reply = requests.post(url + "/api/embed", json=body, timeout=30)
    reply.raise_for_status()
    vector: list[float] = reply.json()["embeddings"][0]
    return vector


def embed_calls(fleet: LocalFleet) -> tuple[int, int]:
    """(calls, failed calls) of the embedding model, over the simulators."""
    models = [fleet.sim_stats(name)["models"].get(EMBED + ":latest", {}) for name in fleet.sim_urls]
    return sum(m.get("requests", 0) for m in models), sum(m.get("errors", 0) for m in models)


def slow_embeds(fleet: LocalFleet) -> None:
    for name in fleet.sim_urls:
        fleet.faults(name, slow_factor=SLOW)


def test_waiting_embed_jobs_ride_in_one_call_each_with_its_own_answer(
    healthy_fleet: LocalFleet,
) -> None:
    fleet = healthy_fleet
    slow_embeds(fleet)
    texts = [f"embedding batch text number {i}" for i in range(48)]
    # Published at once, so they wait together: one by one, on a busy machine, each could
    # find a slot just freed and run alone (a job rides only when it has to wait).
    jobs = infer.submit_many(
        [{"model": EMBED, "kind": "embed", "input": t, "cache": False} for t in texts]
    )
    results = results_of(jobs, timeout=90)
    fleet.clear_faults()

    calls, failed = embed_calls(fleet)
    sizes = [r.routing.batch_size for r in results]
    assert failed == 0
    # Fewer calls than jobs: most jobs rode in another's call.
    assert calls < len(jobs) / 2, (calls, sizes)
    assert max(sizes) > 1
    for job, result, text in zip(jobs, results, texts, strict=True):
        # Each job its own result: its own id, its own vector, its own routing.
        assert result.id == job.id and result.kind == "embed"
        assert result.embeddings == [direct_vector(fleet, text)], text
        assert result.routing.instance in fleet.sim_urls
        assert result.routing.wait_s >= 0 and result.routing.service_s > 0
        if result.routing.batch_size > 1:
            assert result.routing.batch_leader is not None
    # The riders of one call name the same leader, and their number is the batch's size.
    by_leader: dict[str, list[int]] = {}
    for r in results:
        if r.routing.batch_leader:
            by_leader.setdefault(r.routing.batch_leader, []).append(r.routing.batch_size)
    assert all(len(s) == s[0] and set(s) == {s[0]} for s in by_leader.values()), by_leader
    # One call in flight per slot at most: a batch is one request.
    for name in fleet.sim_urls:
        assert fleet.sim_stats(name)["peak_in_flight"] <= 2


def test_a_bad_input_fails_only_its_own_job(healthy_fleet: LocalFleet) -> None:
    fleet = healthy_fleet
    slow_embeds(fleet)
    # Every slot is first held by a chat job of ~4 s, so that the embed jobs all wait, and
    # ride, whatever the machine's speed. (Published at once onto a free fleet, the first
    # jobs ran alone, and on a slow machine the bad input was once among them: its call
    # failed alone, and nothing was split.)
    slots = len(fleet.sim_urls) * 2
    fillers = infer.submit_many(
        [
            {
                "model": "llama3.2:3b",
                "kind": "generate",
                "prompt": f"hold the slot {i}",
                "options": {"num_predict": 16},  # ~4 s, slowed as the embeds are
                "cache": False,
            }
            for i in range(slots)
        ]
    )
    wait_until(lambda: sum(fleet.slots_held().values()) == slots, 30, "every slot held")
    # truncate=False: an input longer than the context (4096 tokens) is a 400 for the whole
    # call that holds it. Last in line, the bad input rides in the call of a job before it.
    bad_text = "word " * 5000
    # 12 jobs: each waits in a thread of its tier's router (16 in the test fleet).
    texts = [f"good input {i}" for i in range(11)] + [bad_text]
    jobs = infer.submit_many(
        [
            {"model": EMBED, "kind": "embed", "input": t, "truncate": False, "cache": False}
            for t in texts
        ]
    )
    wait_until(
        lambda: sum(len(w) for w in fleet.waiters().values()) == len(jobs),
        30,
        "every embed job waiting for a slot",
    )
    assert sum(fleet.slots_held().values()) == slots  # the fillers still hold every slot
    results_of(fillers, timeout=60)
    deadline = time.monotonic() + 90
    while not all(j.ready() for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    fleet.clear_faults()
    assert all(j.ready() for j in jobs), {j.id: j.state for j in jobs if not j.ready()}

    with pytest.raises(JobRejected):
        jobs[-1].get(timeout=1)
    good = [j.get(timeout=1) for j in jobs[:-1]]
    for result, text in zip(good, texts[:-1], strict=True):
        assert result.embeddings == [direct_vector(fleet, text, truncate=False)]
    calls, failed = embed_calls(fleet)
    # The batch holding the bad input failed once, then the bad input failed again alone (a
    # 4xx is not retried): two failed calls; every neighbour it had in that batch succeeded on
    # its own. (A bad input that ran alone from the start would fail once.)
    assert failed == 2, (calls, failed)
    for name in fleet.sim_urls:
        assert fleet.sim_stats(name)["peak_in_flight"] <= 2


def test_a_lone_embed_job_does_not_wait(healthy_fleet: LocalFleet) -> None:
    """With nothing else of its model waiting, a job's call goes at once: no linger."""
    result = infer.delay(model=EMBED, kind="embed", input="alone", cache=False).get(timeout=30)
    assert result.routing.batch_size == 1 and result.routing.batch_leader is None
    assert result.embeddings == [direct_vector(healthy_fleet, "alone")]
