"""Silence that learns: a hung server is cut within seconds, a slow first token that is
legitimate (a long prompt, a cold load) is not.

The learned bounds (``app.jobs.silence``) are unit-tested below; the rest runs a fleet of its own
(three simulators, workers, routers) with a floor of 1 s, so "within seconds" is measurable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app.bench.harness import LocalFleet, free_port, own_fleet, wait_until
from app.jobs.silence import CHARS_PER_TOKEN, budget, prompt_chars, samples
from app.schemas import Answer, InferRequest, Timings
from app.settings import Settings
from app.state import keys
from app.state.fleet import fleet_state
from tasks import infer

CHAT = "llama3.2:3b"
BIG = "big:70b"
FLOOR_S = 1.0
COLD_LOAD_S = 20.0


# The bounds -------------------------------------------------------------------------------


def _settings(**kw: float) -> Settings:
    return Settings(silence_floor_s=1.0, silence_factor=10.0, silence_load_factor=3.0, **kw)


def test_nothing_learned_means_no_bound_but_request_timeout() -> None:
    b = budget(
        {"ttft": None, "pe": None, "gap": None, "load": None, "loaded": True}, 100, _settings()
    )
    assert (b.first_s, b.gap_s) == (None, None)


def test_the_first_token_bound_grows_with_the_prompt_and_has_a_floor() -> None:
    stats = {"ttft": 0.02, "pe": 0.001, "gap": 0.01, "load": 2.0, "loaded": True}
    short = budget(stats, 10, _settings())
    long = budget(stats, 5000, _settings())
    assert short.first_s == 1.0 and short.gap_s == 1.0  # the floor
    assert long.first_s == pytest.approx(10 * (0.02 + 0.001 * 5000 / CHARS_PER_TOKEN))
    slow_gap = budget(stats | {"gap": 0.5}, 10, _settings())
    assert slow_gap.gap_s == pytest.approx(5.0)


def test_a_cold_load_adds_its_learned_time_or_lifts_the_bound() -> None:
    cold = {"ttft": 0.02, "pe": 0.001, "gap": 0.01, "load": 20.0, "loaded": False}
    assert budget(cold, 10, _settings()).first_s == pytest.approx(1.0 + 3 * 20.0)
    assert budget(cold | {"load": None}, 10, _settings()).first_s is None


def test_what_an_answer_teaches() -> None:
    reply = Answer(text="x", prompt_tokens=100, timings=Timings(load_s=3.0, prompt_eval_s=0.5))
    learned = samples(CHAT, reply, first_s=3.6, gap_s=0.02)
    assert learned == {
        f"ttft:{CHAT}": pytest.approx(0.1),
        f"pe:{CHAT}": pytest.approx(0.005),
        f"gap:{CHAT}": 0.02,
    }
    assert samples(CHAT, reply, first_s=None, gap_s=None) == {}
    chat = InferRequest(kind="chat", model=CHAT, messages=[{"role": "user", "content": "abcd"}])
    assert prompt_chars(chat) == 4


# With real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def silent_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    chat = {
        "name": CHAT,
        "kind": "chat",
        "tokens_per_second": 400.0,
        "default_num_predict": 8,
        "prompt_tokens_per_second": 100.0,  # a 300-word prompt: 3 s before the first token
        "load_seconds": 0.2,
    }
    big = {"name": BIG, "kind": "chat", "tokens_per_second": 400.0, "load_seconds": COLD_LOAD_S}
    sims = [
        {
            "name": name,
            "port": free_port(),
            "num_parallel": 2,
            "preloaded": [CHAT] + ([BIG] if name == "sil-c" else []),
            "models": [chat] + ([big] if name == "sil-c" else []),
        }
        for name in ("sil-a", "sil-b", "sil-c")
    ]
    workdir: Path = tmp_path_factory.mktemp("silent")
    with own_fleet(
        workdir,
        sims,
        CORRAL_NAMESPACE=f"sil{os.getpid()}",
        CORRAL_SILENCE_FLOOR_S=str(FLOOR_S),
        CORRAL_REQUEST_TIMEOUT="60",
        CORRAL_DOWN_COOLDOWN="5",
    ) as fleet:
        # Teach every instance what the chat model's answers take.
        jobs = [infer.delay(model=CHAT, prompt=f"warm up {i}", cache=False) for i in range(18)]
        for job in jobs:
            job.get(timeout=30)
        state = fleet_state()
        wait_until(
            lambda: all(
                state.instances.silence_stats(n, CHAT)["gap"] is not None for n in fleet.sim_urls
            ),
            10,
            "every instance to learn",
        )
        yield fleet


def _row(name: str) -> dict[str, str]:
    state = fleet_state()
    return state.redis.hgetall(keys.instance(state.ns, name))


def _close_breaker(name: str) -> None:
    state = fleet_state()
    state.redis.hset(
        keys.instance(state.ns, name),
        mapping={"breaker": "closed", "consecutive": 0, "errors": 0, "down_until": 0},
    )


@pytest.mark.fleet
def test_one_hung_box_among_three(silent_fleet: LocalFleet) -> None:
    """sil-a takes requests and never answers (its /api/ps still does): its jobs are cut
    after about the floor and retried elsewhere, and its breaker opens at once."""
    silent_fleet.faults("sil-a", hang=True)
    try:
        started = time.time()
        jobs = [infer.delay(model=CHAT, prompt=f"short {i}", cache=False) for i in range(30)]
        results = [job.get(timeout=30) for job in jobs]
        took = [r.routing.finished_at - started for r in results]
        print(f"\n30 jobs, one box hung: slowest done after {max(took):.2f} s")
        assert max(took) < 5.0, sorted(took)[-5:]
        assert all(r.routing.instance != "sil-a" for r in results)
        cut = [r for r in results if r.routing.attempts > 1]
        assert cut, "no job was sent to the hung box"
        assert all("sil-a" in r.routing.excluded for r in cut)
        row = _row("sil-a")
        # Opened at once: fewer failures than breaker_threshold (3) in a row would need.
        assert float(row["down_until"]) > started and row["breaker"] in ("open", "half_open")
        assert silent_fleet.sim_stats("sil-a")["cancelled_total"] >= len(cut)
    finally:
        silent_fleet.faults("sil-a", hang=False)
        _close_breaker("sil-a")


@pytest.mark.fleet
def test_a_long_prompt_is_not_cut(silent_fleet: LocalFleet) -> None:
    prompt = " ".join(f"word{i}" for i in range(300))  # 3 s of prompt evaluation
    result = infer.delay(model=CHAT, prompt=prompt, cache=False).get(timeout=60)
    assert result.routing.attempts == 1
    assert result.timings.prompt_eval_s > 2.5  # far past the 1 s floor, before any token


@pytest.mark.fleet
def test_a_20_s_cold_load_is_not_cut(silent_fleet: LocalFleet) -> None:
    # The big model answers quickly while loaded: sil-c learns its first token and gaps.
    for i in range(3):
        infer.delay(model=BIG, prompt=f"warm {i}", cache=False).get(timeout=30)
    state = fleet_state()
    wait_until(
        lambda: state.instances.silence_stats("sil-c", BIG)["ttft"] is not None, 5, "learning"
    )
    # Unload it (an empty prompt with keep_alive 0, as with Ollama), and let a heartbeat see it.
    url = silent_fleet.sim_urls["sil-c"] + "/api/generate"
    requests.post(url, json={"model": BIG, "keep_alive": 0}, timeout=10).raise_for_status()
    wait_until(lambda: not state.instances.silence_stats("sil-c", BIG)["loaded"], 10, "the unload")

    result = infer.delay(model=BIG, prompt="after a cold load", cache=False).get(timeout=60)
    assert result.routing.attempts == 1
    assert result.timings.load_s >= COLD_LOAD_S - 0.5
    # Learned for next time: the bound before a cold load's first token includes it.
    assert state.instances.silence_stats("sil-c", BIG)["load"] == pytest.approx(
        COLD_LOAD_S, rel=0.1
    )
    assert _row("sil-c")["breaker"] == "closed"
