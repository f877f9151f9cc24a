"""Jobs across hosts, and faults across the network (issue 15), on the bed of ``bed.py``.

Every job must end with exactly one result, no server above its parallelism; how many ran
twice (at-least-once windows) is printed with each fault.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from app.bench.harness import wait_until
from app.schemas import InferResult
from tasks import infer
from tests.multihost.bed import BROKERS, CHAT, GATEWAY, GPUS, Bed


def test_jobs_run_across_hosts_on_every_gpu_host(bed: Bed) -> None:
    before = bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"across {i}", cache=False) for i in range(30)]
    bed.expect_each_once(jobs, before, "no fault")
    served = {InferResult.model_validate(j.result).routing.instance for j in jobs}
    assert served == {h.name for h in GPUS}


def _generate(url: str, prompt: str, tokens: int = 8) -> httpx.Response:
    body = {"model": CHAT, "prompt": prompt, "stream": False, "options": {"num_predict": tokens}}
    return httpx.post(f"{url}/api/generate", json=body, timeout=90)


def _chat_openai(url: str, prompt: str) -> httpx.Response:
    body = {"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=90)


def test_the_gateway_cut_off_from_the_broker_answers_503_and_serves_again(bed: Bed) -> None:
    url = bed.gateway_url
    before = bed.served()
    assert _generate(url, "before").status_code == 200
    with ThreadPoolExecutor(12) as pool:
        # Submitted before the cut (all six running: the fleet's six slots), their results
        # come through Redis, which stays reachable.
        running = [pool.submit(_generate, url, f"in flight {i}", 120) for i in range(6)]
        wait_until(lambda: bed.in_flight() == len(running), 30, "every job running")
        # The brokers go silent for the gateway: its open connections get no answer, its new
        # ones time out, as in a partition. Redis stays reachable.
        for broker in BROKERS:
            broker.silence_towards([GATEWAY])
        try:
            started = time.monotonic()
            during = [pool.submit(_generate, url, f"cut {i}") for i in range(4)]
            during += [pool.submit(_chat_openai, url, f"cut openai {i}") for i in range(2)]
            answers = [f.result(timeout=120) for f in during]
            took = time.monotonic() - started
            time.sleep(max(0.0, 5 - took))  # cut off for a few seconds at least
        finally:
            for broker in BROKERS:
                broker.answer_again([GATEWAY])
        print(f"gateway cut off: {len(answers)} requests answered in {took:.1f} s:")
        for r in answers:
            print(f"  {r.status_code} in {r.elapsed.total_seconds():.1f} s: {r.text[:200]}")
        assert [r.status_code for r in answers] == [503] * len(answers)
        assert all(isinstance(r.json()["error"], str) for r in answers[:4])  # Ollama's shape
        assert all(r.json()["error"]["type"] == "api_error" for r in answers[4:])  # OpenAI's
        assert all(r.headers.get("retry-after") for r in answers)
        assert [f.result(timeout=120).status_code for f in running] == [200] * len(running)
    # Serves again once back.
    tries: list[int] = []
    wait_until(
        lambda: tries.append(_generate(url, "after").status_code) or tries[-1] == 200,
        60,
        "the gateway serving",
    )
    assert _chat_openai(url, "after openai").status_code == 200
    refused = len(answers) + len(tries) - 1
    # A job whose publish reached the broker but whose confirm never came back runs for
    # nobody: the at-least-once window of a publish (its client got the 503 and may retry).
    answered = 1 + len(running) + 2
    wait_until(lambda: bed.served() - before >= answered, 30, "the answered jobs counted")
    time.sleep(2)
    orphans = bed.served() - before - answered
    print(f"  {orphans} of the {refused} refused jobs still ran (they reached the broker)")
    assert 0 <= orphans <= refused
    for host in GPUS:
        assert bed.sim_stats(host)["peak_in_flight"] <= 2, host.name


def test_a_gpu_host_cut_off_for_20_s_loses_nothing_and_serves_again(bed: Bed) -> None:
    gpu = GPUS[1]
    before = bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"cut {i}", cache=False) for i in range(40)]
    wait_until(lambda: bed.sim_stats(gpu)["in_flight"] > 0, 30, f"jobs running on {gpu.name}")
    gpu.cut()
    try:
        time.sleep(20)
    finally:
        gpu.restore()
    bed.expect_each_once(jobs, before, f"{gpu.name} cut off for 20 s", timeout=180)
    # Back on the network, it takes jobs again.
    served_before = int(bed.sim_stats(gpu)["requests_total"])
    wait_until(bed.ready, 60, f"{gpu.name} back in the fleet", every=0.5)
    before = bed.served()
    more = [infer.delay(model=CHAT, prompt=f"back {i}", cache=False) for i in range(18)]
    bed.expect_each_once(more, before, f"after {gpu.name} came back")
    assert int(bed.sim_stats(gpu)["requests_total"]) > served_before


def test_the_redis_primary_killed_sentinel_promotes_and_jobs_finish(bed: Bed) -> None:
    before = bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"redis {i}", cache=False) for i in range(40)]
    wait_until(lambda: sum(j.ready() for j in jobs) >= 4, 30, "the first results")
    old = bed.redis_primary()
    running = len(jobs) - sum(j.ready() for j in jobs)
    bed.kill("redis-primary")
    # Submitted while the Sentinels have yet to notice: each waits for the new primary.
    jobs += [infer.delay(model=CHAT, prompt=f"redis late {i}", cache=False) for i in range(10)]
    bed.expect_each_once(jobs, before, "Redis primary killed", timeout=180)
    assert bed.redis_primary() != old
    assert running > 20, "the primary was killed after most jobs had ended"


def test_the_broker_node_leading_the_queues_stopped_work_goes_on(bed: Bed) -> None:
    before = bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"broker {i}", cache=False) for i in range(40)]
    wait_until(lambda: sum(j.ready() for j in jobs) >= 4, 30, "the first results")
    leader = bed.queue_home(CHAT)
    bed.rabbitmqctl(leader, "stop_app")
    try:
        bed.expect_each_once(
            jobs, before, f"RabbitMQ node {leader.name} (queue leader) stopped", timeout=180
        )
        before = bed.served()
        late = [infer.delay(model=CHAT, prompt=f"no leader {i}", cache=False) for i in range(10)]
        bed.expect_each_once(late, before, f"submitted with {leader.name} down")
    finally:
        bed.rabbitmqctl(leader, "start_app")
    # Every router and worker consumes again (their consumers restart after channel errors).
    back = time.monotonic()
    wait_until(bed.ready, 120, "every router consuming again", every=0.5)
    print(f"  every router consuming again {time.monotonic() - back:.0f} s after the restart")


def test_a_router_host_killed_the_other_carries_every_tier(bed: Bed) -> None:
    before = bed.served()
    jobs = [infer.delay(model=CHAT, prompt=f"router host {i}", cache=False) for i in range(40)]
    wait_until(lambda: sum(j.ready() for j in jobs) >= 4, 30, "the first results")
    for tier in ("interactive", "normal", "batch"):
        bed.kill(f"router-{tier}-router-1")
    bed.expect_each_once(jobs, before, "router host killed")


def test_after_a_router_host_died_new_jobs_still_run(bed: Bed) -> None:
    before = bed.served()
    late = [
        infer.delay(model=CHAT, prompt=f"after {i}", cache=False, tier="interactive")
        for i in range(6)
    ]
    bed.expect_each_once(late, before, "after the router host died", timeout=60)
