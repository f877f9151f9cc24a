"""The core path, end to end: real RabbitMQ, Redis, simulator and `celery worker` processes."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery.signals import before_task_publish

from app.bench.harness import LocalFleet, depth, results_of, wait_until
from app.errors import InvalidRequest, ModelNotServed, RetriesExhausted
from app.ops.dead_letters import read_all, replay
from app.queues import dead_letter_queue, route_queue
from app.schemas import InferResult
from app.state import keys
from tasks import infer

pytestmark = pytest.mark.fleet

CHAT = "llama3.2:3b"
EMBED = "nomic-embed-text"


def gen(i: int, **extra) -> dict:
    return {"model": CHAT, "prompt": f"question {i}", "options": {"num_predict": 6}, **extra}


def test_generate_chat_embed_through_router_and_instance(healthy_fleet: LocalFleet) -> None:
    r = infer.delay(**gen(0), tier="interactive", agent="planner-7")
    out = r.get(timeout=30)
    assert isinstance(out, InferResult)
    assert out.id == r.id and out.kind == "generate" and out.text
    assert out.routing.instance in healthy_fleet.sim_urls
    assert out.routing.queue.endswith(f"instance.{out.routing.instance}")
    assert out.completion_tokens == 6 and out.routing.attempts == 1

    c = infer.delay(model=CHAT, kind="chat", messages=[{"role": "user", "content": "hi"}])
    chat = c.get(timeout=30)
    assert chat.id == c.id and chat.message["role"] == "assistant" and chat.message["content"]

    e = infer.delay(model=EMBED, kind="embed", input=["a", "b"], cache=False)
    emb = e.get(timeout=30)
    assert emb.id == e.id and len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 768


def test_no_instance_ever_runs_more_than_its_parallelism(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        # ~0.25 s a job, so jobs overlap even when a loaded machine routes slowly.
        healthy_fleet.faults(name, slow_factor=12.0)
    with ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(
                lambda i: infer.delay(**gen(i), tier=("batch", "normal", "interactive")[i % 3]).get(
                    timeout=60
                ),
                range(60),
            )
        )
    assert len({r.id for r in results}) == 60
    per_instance = {name: healthy_fleet.sim_stats(name) for name in healthy_fleet.sim_urls}
    for name, stats in per_instance.items():
        assert stats["peak_in_flight"] <= 2, (name, stats)
    # The work was actually spread: every instance ran some of it at full parallelism.
    assert all(s["peak_in_flight"] == 2 for s in per_instance.values()), per_instance


def test_interactive_job_overtakes_a_batch_backlog(healthy_fleet: LocalFleet) -> None:
    # Slow jobs (~1 s) while the backlog is queued, so 200 batch jobs really wait.
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=40.0)
    batch = [infer.delay(**gen(i), tier="batch") for i in range(200)]
    urgent = infer.delay(**gen(999), tier="interactive")
    done = urgent.get(timeout=60)
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    batch_results = [r.get(timeout=120) for r in batch]
    finished_before = sum(b.routing.finished_at < done.routing.finished_at for b in batch_results)
    assert finished_before <= 20, f"{finished_before} batch jobs finished before the urgent one"


def test_failing_instance_is_excluded_on_retry(healthy_fleet: LocalFleet) -> None:
    healthy_fleet.faults("sim-a", error_rate=1.0)
    results = results_of([infer.delay(**gen(i)) for i in range(24)], timeout=60)
    assert all(r.routing.instance != "sim-a" for r in results)
    retried = [r for r in results if "sim-a" in r.routing.excluded]
    assert retried, "no job was routed to the failing instance"
    assert all(r.routing.attempts == 2 for r in retried)
    assert healthy_fleet.sim_stats("sim-a")["errors_total"] >= len(retried)


def test_instance_refusing_connections_loses_no_job(healthy_fleet: LocalFleet) -> None:
    import requests

    requests.post(
        healthy_fleet.sim_urls["sim-b"] + "/sim/refuse", json={"seconds": 4}, timeout=5
    ).raise_for_status()
    results = results_of([infer.delay(**gen(i)) for i in range(24)], timeout=60)
    assert len({r.id for r in results}) == 24
    assert all(r.text for r in results)
    wait_until(lambda: _answers(healthy_fleet.sim_urls["sim-b"]), 15, "sim-b to listen again")


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/api/version", timeout=1).ok
    except requests.RequestException:
        return False


def test_killed_instance_worker_job_is_redelivered_once(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=100.0)  # ~2 s a job
    dead_before = depth(dead_letter_queue())
    jobs = [infer.delay(**gen(i)) for i in range(6)]
    wait_until(lambda: healthy_fleet.sim_stats("sim-a")["in_flight"] > 0, 20, "a job on sim-a")
    healthy_fleet.procs["worker-sim-a"].signal(signal.SIGKILL)
    healthy_fleet.procs["worker-sim-a"].proc.wait(10)
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    healthy_fleet.start_worker("sim-a")
    results = [j.get(timeout=90) for j in jobs]
    assert [r.id for r in results] == [j.id for j in jobs]
    assert all(r.text for r in results)
    assert depth(dead_letter_queue()) == dead_before
    wait_until(healthy_fleet.ready, 30, "sim-a's worker back")


def test_job_failing_everywhere_is_dead_lettered_with_history(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=1.0)
    before = depth(dead_letter_queue())
    job = infer.delay(**gen(1))
    with pytest.raises(RetriesExhausted) as info:
        job.get(timeout=60)
    err = info.value
    assert err.job_id == job.id
    assert len(err.history) == 3
    assert {h["instance"] for h in err.history} == set(healthy_fleet.sim_urls)
    assert all(h["error"] == "InstanceFailed" for h in err.history)
    wait_until(lambda: depth(dead_letter_queue()) == before + 1, 10, "the dead letter")
    record = next(r for r in read_all() if r["job_id"] == job.id)
    assert len(record["history"]) == 3 and record["error"] == "RetriesExhausted"
    assert record["request"]["prompt"] == "question 1"

    # Once the fleet is healthy again, the dead job can be replayed as a new job.
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, error_rate=0.0)
    [(old, new)] = replay({job.id})
    assert old == job.id and infer.AsyncResult(new).get(timeout=30).text
    assert depth(dead_letter_queue()) == before


def test_deterministic_request_is_served_from_cache(healthy_fleet: LocalFleet) -> None:
    same = {"model": CHAT, "prompt": f"cache me {time.time()}", "options": {"temperature": 0}}
    first = infer.delay(**same).get(timeout=30)
    served = sum(healthy_fleet.sim_stats(n)["requests_total"] for n in healthy_fleet.sim_urls)
    second = infer.delay(**same, tier="interactive").get(timeout=30)
    again = sum(healthy_fleet.sim_stats(n)["requests_total"] for n in healthy_fleet.sim_urls)
    assert not first.cached and second.cached
    assert second.text == first.text and again == served

    random_twice = [infer.delay(**gen(7)).get(timeout=30) for _ in range(2)]
    assert not any(r.cached for r in random_twice)
    bypass = infer.delay(**same, cache=False).get(timeout=30)
    assert not bypass.cached


def test_identical_requests_in_flight_are_computed_once(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)
    same = {"model": CHAT, "prompt": f"flight {time.time()}", "options": {"seed": 42}}
    jobs = [infer.delay(**same) for _ in range(5)]
    results = [j.get(timeout=60) for j in jobs]
    assert sum(not r.cached for r in results) == 1
    assert len({r.text for r in results}) == 1


BAD_REQUESTS = [
    ({"model": CHAT, "kind": "summarize", "prompt": "x"}, "kind"),
    ({"model": CHAT}, "needs 'prompt'"),
    ({"model": CHAT, "kind": "chat", "messages": []}, "at least one message"),
    ({"model": CHAT, "prompt": "x", "tier": "urgent"}, "tier"),
    ({"model": CHAT, "prompt": "x", "priority": 12}, "priority"),
    ({"model": CHAT, "prompt": "x", "options": {"temperature": "hot"}}, "temperature"),
    ({"model": CHAT, "prompt": "x", "options": {"tempreature": 0.1}}, "tempreature"),
    ({"model": CHAT, "prompt": "x", "input": ["y"]}, "not allowed"),
    ({"model": "", "prompt": "x"}, "model"),
    ({"model": CHAT, "prompt": 42}, "prompt"),
    ({"model": CHAT, "prompt": "x", "_route": {"submitted_at": 0}}, "_route"),
]


@pytest.mark.parametrize(("fields", "mentions"), BAD_REQUESTS)
def test_bad_input_raises_at_the_call_and_publishes_nothing(
    healthy_fleet: LocalFleet, fields: dict, mentions: str
) -> None:
    published = []

    def record(**kwargs) -> None:
        published.append(kwargs)

    before_task_publish.connect(record, weak=False)
    try:
        before = depth(route_queue(CHAT, "normal"))
        with pytest.raises(InvalidRequest, match=mentions):
            infer.delay(**fields)
    finally:
        before_task_publish.disconnect(record)
    assert published == []
    assert depth(route_queue(CHAT, "normal")) == before


def test_unknown_model_fails_fast(healthy_fleet: LocalFleet) -> None:
    started = time.time()
    with pytest.raises(ModelNotServed, match="no-such-model"):
        infer.delay(model="no-such-model:1b", prompt="x")
    assert time.time() - started < 1.0


def test_streaming_job_relays_tokens_before_it_ends(healthy_fleet: LocalFleet) -> None:
    from app.jobs.relay import token_relay

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)  # ~0.05 s a token
    job = infer.delay(**gen(3), stream=True, cache=False)
    relay = token_relay()
    first = wait_until(lambda: relay.read(job.id, block_ms=200), 20, "the first token")
    assert not job.ready(), "the first token should arrive long before the job ends"
    result = job.get(timeout=30)
    entries = first + relay.read(job.id, after=first[-1].id, block_ms=0)
    text = "".join(e.chunk.get("response", "") for e in entries)
    assert text == result.text and entries[-1].chunk["done"] is True
    assert {e.attempt for e in entries} == {1}


def test_drained_instance_gets_no_new_jobs(healthy_fleet: LocalFleet) -> None:
    from app.state.fleet import fleet_state

    fleet_state().instances.set_enabled("sim-a", False)
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: infer.delay(**gen(i)).get(timeout=60), range(24)))
    finally:
        fleet_state().instances.set_enabled("sim-a", True)
    assert {r.routing.instance for r in results} <= {"sim-b", "sim-c"}


def test_strategy_changes_live(healthy_fleet: LocalFleet) -> None:
    from app.state.fleet import fleet_state

    fleet_state().instances.set_strategy("smart", CHAT)
    try:
        result = infer.delay(**gen(5)).get(timeout=30)
    finally:
        fleet_state().instances.set_strategy(None, CHAT)
    assert result.routing.strategy == "smart" and "cost_ms" in result.routing.score
    assert infer.delay(**gen(6)).get(timeout=30).routing.strategy == "least_connections"


def test_resubmitting_a_job_key_returns_the_first_job(healthy_fleet: LocalFleet) -> None:
    key = f"report-{time.time()}"
    first = infer.delay(**gen(8), job_key=key)
    second = infer.delay(**gen(9), job_key=key)
    assert second.id == first.id
    assert second.get(timeout=30).text == first.get(timeout=30).text
    served = sum(healthy_fleet.sim_stats(n)["requests_total"] for n in healthy_fleet.sim_urls)
    assert served == 1


def test_jobs_of_an_instance_whose_worker_died_go_elsewhere(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=50.0)  # ~1 s a job
    jobs = [infer.delay(**gen(i)) for i in range(6)]
    wait_until(lambda: healthy_fleet.sim_stats("sim-c")["in_flight"] > 0, 20, "a job on sim-c")
    worker = healthy_fleet.procs["worker-sim-c"]
    worker.signal(signal.SIGKILL)  # and nobody restarts it
    worker.proc.wait(10)
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    try:
        results = [j.get(timeout=60) for j in jobs]
        assert {r.routing.instance for r in results} <= {"sim-a", "sim-b"}
        assert [r.id for r in results] == [j.id for j in jobs]
    finally:
        healthy_fleet.start_worker("sim-c")
        wait_until(healthy_fleet.ready, 30, "sim-c's worker back")


def test_fleet_state_lost_in_redis_heals_and_loses_no_job(healthy_fleet: LocalFleet) -> None:
    from app.state.fleet import fleet_state

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)  # ~0.4 s a job
    jobs = [infer.delay(**gen(i), tier=("batch", "interactive")[i % 2]) for i in range(30)]
    wait_until(lambda: healthy_fleet.sim_stats("sim-b")["in_flight"] > 0, 20, "jobs running")
    state = fleet_state()
    for key in state.redis.scan_iter(keys.everything(state.ns)):  # what a Redis restart would lose
        state.redis.delete(key)
    results = [j.get(timeout=90) for j in jobs]
    assert [r.id for r in results] == [j.id for j in jobs]
    for name in healthy_fleet.sim_urls:
        assert healthy_fleet.sim_stats(name)["peak_in_flight"] <= 2, name


def test_instance_list_lost_alone_heals_and_loses_no_job(healthy_fleet: LocalFleet) -> None:
    """Redis may lose some keys and not others (keys deleted one by one, as the test above
    does, while the workers write): an instance whose row survived but not its place in the
    list must still be seen again, or its slot count stays held out of sight."""
    from app.state.fleet import fleet_state

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=20.0)  # ~0.4 s a job
    jobs = [infer.delay(**gen(i)) for i in range(12)]
    wait_until(lambda: healthy_fleet.sim_stats("sim-b")["in_flight"] > 0, 20, "jobs running")
    state = fleet_state()
    state.redis.delete(keys.instances(state.ns), keys.instance_models(state.ns, "sim-b"))
    results = [j.get(timeout=90) for j in jobs]
    assert [r.id for r in results] == [j.id for j in jobs]
    wait_until(healthy_fleet.idle, 20, "every slot given back")
    assert set(healthy_fleet.sim_urls) <= set(state.instances.instance_names())


def test_killed_router_loses_no_waiting_job(healthy_fleet: LocalFleet) -> None:
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=25.0)  # ~0.5 s a job: most of 30 wait
    jobs = [infer.delay(**gen(i)) for i in range(30)]
    wait_until(lambda: healthy_fleet.sim_stats("sim-a")["in_flight"] > 0, 20, "jobs running")
    router = healthy_fleet.procs["router-normal"]
    router.signal(signal.SIGKILL)
    router.proc.wait(10)
    healthy_fleet.start_router("normal")
    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    results = results_of(jobs, timeout=90)
    assert [r.id for r in results] == [j.id for j in jobs]
    assert all(r.text for r in results)
    for name in healthy_fleet.sim_urls:
        assert healthy_fleet.sim_stats(name)["peak_in_flight"] <= 2, name
    wait_until(healthy_fleet.ready, 30, "the router back")


def test_an_instance_down_for_20_s_loses_no_job(healthy_fleet: LocalFleet) -> None:
    import requests

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=12.0)  # ~0.25 s a job
    requests.post(
        healthy_fleet.sim_urls["sim-b"] + "/sim/refuse", json={"seconds": 20}, timeout=5
    ).raise_for_status()
    started = time.monotonic()
    jobs = [infer.delay(**gen(i)) for i in range(60)]
    results = results_of(jobs, timeout=60)
    assert len({r.id for r in results}) == 60 and all(r.text for r in results)
    # The other two took the work meanwhile; nothing waited for sim-b to come back.
    assert time.monotonic() - started < 20
    assert not any(r.routing.instance == "sim-b" for r in results)
    wait_until(lambda: _answers(healthy_fleet.sim_urls["sim-b"]), 30, "sim-b to listen again")
    for name in healthy_fleet.sim_urls:
        assert healthy_fleet.sim_stats(name)["peak_in_flight"] <= 2, name
    # Back, it gets jobs again.
    wait_until(
        lambda: infer.delay(**gen(99)).get(timeout=30).routing.instance == "sim-b",
        30,
        "a job on sim-b",
        every=0.2,
    )
