"""The simulated scheduler: slot queue, bounded load queue, loads, eviction, keep-alive."""

from __future__ import annotations

import time

import httpx
import ollama
import pytest

from app.simulator import SimModel

BUSY = "server busy, please try again.  maximum pending requests exceeded"


def test_slots_queue_without_limit_and_peaks_reset(start_sim, concurrently):
    sim = start_sim(
        num_parallel=2,
        models=[SimModel(name="slow", tokens_per_second=50)],
        preloaded=["slow"],
    )
    client = sim.client()

    def ask():
        return client.generate(model="slow", prompt="hi", options={"num_predict": 8})

    replies = concurrently([ask] * 6)
    assert all(isinstance(r, ollama.GenerateResponse) and r.done for r in replies)
    stats = sim.stats()
    assert (stats["peak_active"], stats["peak_in_flight"]) == (2, 6)
    assert stats["models"]["slow:latest"]["peak_active"] == 2
    assert (stats["requests_total"], stats["errors_total"], stats["in_flight"]) == (6, 0, 0)
    # Waiting for a slot shows in total_duration, not in load_duration.
    slowest = max(replies, key=lambda r: r.total_duration)
    assert slowest.total_duration > 2 * slowest.eval_duration
    assert slowest.load_duration < slowest.eval_duration

    reset = sim.post("/sim/reset").json()
    assert (reset["peak_active"], reset["peak_in_flight"], reset["requests_total"]) == (0, 0, 0)


def test_preloads_and_unloads_are_not_inference_in_flight(start_sim, concurrently):
    """Ollama serves a preload and an unload without a slot: beside two running requests they
    leave the in-flight peak at the slot count, and are counted apart."""
    sim = start_sim(
        num_parallel=2,
        models=[SimModel(name="slow", tokens_per_second=20), SimModel(name="other")],
        preloaded=["slow"],
    )
    client = sim.client()

    def ask():
        return client.generate(model="slow", prompt="hi", options={"num_predict": 8})

    def manage():
        time.sleep(0.1)  # while both slots are taken
        client.generate(model="slow", prompt="", keep_alive=0)  # unload once they end
        return client.generate(model="other", prompt="")  # preload

    concurrently([ask, ask, manage])
    stats = sim.stats()
    assert (stats["peak_active"], stats["peak_in_flight"]) == (2, 2)
    assert (stats["requests_total"], stats["managed_total"]) == (4, 2)


def test_full_scheduler_queue_answers_503(start_sim, concurrently):
    sim = start_sim(max_queue=1, models=[SimModel(name="cold", load_seconds=0.5)])
    client = sim.client()

    def ask():
        return client.generate(model="cold", prompt="hi", options={"num_predict": 1})

    outcomes = concurrently([ask] * 5)
    rejected = [o for o in outcomes if isinstance(o, ollama.ResponseError)]
    # One request is being loaded for, one waits in the queue, the rest are turned away.
    assert len(rejected) == 3
    assert {(e.status_code, e.error) for e in rejected} == {(503, BUSY)}
    stats = sim.stats()
    assert (stats["rejected_total"], stats["loads_total"]) == (3, 1)


def test_cold_load_then_listed_in_ps(start_sim):
    sim = start_sim(models=[SimModel(name="cold", load_seconds=0.3)])
    assert sim.loaded() == []
    reply = sim.client().generate(model="cold", prompt="hi", options={"num_predict": 1})
    assert reply.load_duration >= 290_000_000  # timers may fire a little early
    assert sim.loaded() == ["cold:latest"]
    assert sim.stats()["loads_total"] == 1
    sim.client().generate(model="cold:latest", prompt="again", options={"num_predict": 1})
    assert sim.stats()["loads_total"] == 1


def test_fourth_model_evicts_an_idle_one(start_sim):
    names = ["m1", "m2", "m3", "m4"]
    sim = start_sim(
        max_loaded_models=3, models=[SimModel(name=n, load_seconds=0.01) for n in names]
    )
    client = sim.client()
    for name in names:
        client.generate(model=name, prompt="hi", options={"num_predict": 1})
    # All have the same keep-alive, so the first by name goes, as in Ollama.
    assert sorted(sim.loaded()) == ["m2:latest", "m3:latest", "m4:latest"]
    stats = sim.stats()
    assert (stats["loads_total"], stats["evictions_total"]) == (4, 1)


def test_eviction_waits_for_a_busy_model(start_sim, concurrently):
    sim = start_sim(
        max_loaded_models=1,
        models=[
            SimModel(name="busy", load_seconds=0, tokens_per_second=20),
            SimModel(name="next", load_seconds=0),
        ],
        preloaded=["busy"],
    )
    client = sim.client()
    started = time.monotonic()
    long, short = concurrently(
        [
            lambda: client.generate(model="busy", prompt="x", options={"num_predict": 6}),
            lambda: (
                time.sleep(0.05),
                client.generate(model="next", prompt="x", options={"num_predict": 1}),
            )[1],
        ]
    )
    assert long.done and short.done
    assert time.monotonic() - started >= 0.25  # "next" had to wait for "busy" to finish
    assert sim.loaded() == ["next:latest"]


def test_one_model_box_switches_after_the_running_requests(start_sim, concurrently):
    """max_loaded_models=1: B waits for A's running requests, then A unloads and B loads once."""
    sim = start_sim(
        max_loaded_models=1,
        num_parallel=2,
        models=[
            SimModel(name="a", load_seconds=0.2, tokens_per_second=20),
            SimModel(name="b", load_seconds=0.2, tokens_per_second=500),
        ],
        preloaded=["a"],
    )
    client = sim.client()
    ended: dict[str, float] = {}

    def ask(model: str, tokens: int, key: str, delay: float = 0.0):
        time.sleep(delay)
        reply = client.generate(model=model, prompt="x", options={"num_predict": tokens})
        ended[key] = time.monotonic()
        return reply

    def watch_while_b_waits():
        # B has arrived, A's two requests still run: A stays loaded, B is not loaded yet.
        time.sleep(0.15)
        return sim.loaded(), sim.stats()

    replies = concurrently(
        [
            lambda: ask("a", 6, "a1"),
            lambda: ask("a", 6, "a2"),
            lambda: ask("b", 1, "b", delay=0.05),
            watch_while_b_waits,
        ]
    )
    a1, a2, b, (loaded_meanwhile, stats_meanwhile) = replies
    assert a1.done and a2.done and b.done
    assert loaded_meanwhile == ["a:latest"]
    assert stats_meanwhile["loads_total"] == 0 and stats_meanwhile["evictions_total"] == 1
    # B's answer came a full load after the last of A's requests ended.
    assert ended["b"] - max(ended["a1"], ended["a2"]) >= 0.19
    assert b.load_duration >= 190_000_000
    assert sim.loaded() == ["b:latest"]
    stats = sim.stats()
    assert (stats["loads_total"], stats["evictions_total"]) == (1, 1)
    models = stats["models"]
    assert (models["a:latest"]["loads"], models["a:latest"]["evictions"]) == (0, 1)
    assert (models["b:latest"]["loads"], models["b:latest"]["evictions"]) == (1, 0)


def test_keep_alive_expiry_and_override(start_sim):
    sim = start_sim(models=[SimModel(name="brief", load_seconds=0)])
    client = sim.client()
    client.generate(model="brief", prompt="x", keep_alive="300ms", options={"num_predict": 1})
    assert sim.loaded() == ["brief:latest"]
    sim.wait_for(lambda: sim.loaded() == [], timeout=3)

    client.generate(model="brief", prompt="x", keep_alive=-1, options={"num_predict": 1})
    assert client.ps().models[0].expires_at.year > 2300
    client.generate(model="brief", prompt="x", keep_alive=0, options={"num_predict": 1})
    assert sim.loaded() == []


def test_changing_num_ctx_reloads(start_sim):
    sim = start_sim(models=[SimModel(name="ctx", load_seconds=0.01)])
    client = sim.client()
    client.generate(model="ctx", prompt="x", options={"num_predict": 1})
    client.generate(model="ctx", prompt="x", options={"num_predict": 1, "num_ctx": 8192})
    assert sim.stats()["loads_total"] == 2
    assert client.ps().models[0].context_length == 8192


def test_embedding_models_have_one_slot(start_sim, concurrently):
    sim = start_sim(
        num_parallel=4,
        models=[
            SimModel(name="embedder", kind="embed", load_seconds=0, prompt_tokens_per_second=200)
        ],
        preloaded=["embedder"],
    )
    client = sim.client()
    texts = ["one two three four five six seven"] * 3
    replies = concurrently([lambda: client.embed(model="embedder", input=texts)] * 3)
    assert all(len(r.embeddings) == 3 for r in replies)
    stats = sim.stats()
    assert (stats["peak_active"], stats["peak_in_flight"]) == (1, 3)


def test_an_embed_call_costs_once_per_call_plus_per_input(start_sim):
    """A GPU's batch: 20 inputs in one call cost the call once, not 20 times."""
    sim = start_sim(
        models=[
            SimModel(
                name="embedder",
                kind="embed",
                load_seconds=0,
                embed_call_seconds=0.2,
                embed_input_seconds=0.01,
            )
        ],
        preloaded=["embedder"],
    )
    client = sim.client()

    def timed(inputs):
        started = time.perf_counter()
        reply = client.embed(model="embedder", input=inputs)
        return reply, time.perf_counter() - started

    _, one = timed(["text 3"])
    batch, twenty = timed([f"text {i}" for i in range(20)])
    assert 0.2 <= one < 0.2 + 0.15
    assert 0.2 + 20 * 0.01 <= twenty < 0.4 + 0.15
    # Each input's vector does not depend on the call it came in.
    alone, _ = timed(["text 3"])
    assert batch.embeddings[3] == alone.embeddings[0]
    assert sim.stats()["models"]["embedder:latest"]["requests"] == 3


def test_client_leaving_aborts_its_load(start_sim):
    sim = start_sim(models=[SimModel(name="cold", load_seconds=1.0)])
    with pytest.raises(httpx.ReadTimeout):
        sim.client(timeout=0.2).generate(model="cold", prompt="x")
    sim.wait_for(lambda: sim.stats()["in_flight"] == 0 and sim.stats()["loading"] is None)
    stats = sim.stats()
    assert (stats["loads_total"], stats["cancelled_total"]) == (0, 1)
    assert sim.loaded() == []


def test_busy_slots_and_slow_factor_stretch_generation(start_sim, concurrently):
    sim = start_sim(
        num_parallel=2,
        parallel_slowdown=1.0,  # two busy slots halve each one's speed
        models=[SimModel(name="m", load_seconds=0, tokens_per_second=200)],
        preloaded=["m"],
    )
    client = sim.client()

    def eval_seconds(num_predict):
        reply = client.generate(model="m", prompt="x", options={"num_predict": num_predict})
        return reply.eval_duration / 1e9

    alone = eval_seconds(30)
    assert alone == pytest.approx(0.15, rel=0.3)
    # The two requests start a few ms apart, so compare their mean with a margin.
    pair = concurrently([lambda: eval_seconds(30)] * 2)
    assert sum(pair) / 2 > 1.5 * alone
    sim.post("/sim/faults", json={"slow_factor": 3})
    assert eval_seconds(10) > 2.5 * alone / 3


# -- memory (memory_bytes): Ollama's fit check beside the model count -------------------

GB = 1_000_000_000


def test_memory_for_two_evicts_an_idle_one_for_a_third(start_sim):
    """The count would allow a third model; the memory does not, so the first by name goes."""
    names = ["s1", "s2", "s3"]
    sim = start_sim(
        max_loaded_models=10,
        memory_bytes=2 * GB + GB // 2,
        models=[SimModel(name=n, size_bytes=GB, load_seconds=0.01) for n in names],
    )
    client = sim.client()
    for name in names:
        client.generate(model=name, prompt="hi", options={"num_predict": 1})
    assert sorted(sim.loaded()) == ["s2:latest", "s3:latest"]
    stats = sim.stats()
    assert (stats["loads_total"], stats["evictions_total"]) == (3, 1)
    assert stats["models"]["s1:latest"]["evictions"] == 1


def test_big_model_waits_for_both_small_ones_then_evicts_both(start_sim, concurrently):
    """The big model needs both small ones out: it loads only after both requests end."""
    sim = start_sim(
        max_loaded_models=10,
        memory_bytes=2 * GB,
        models=[
            SimModel(name="s1", size_bytes=GB, load_seconds=0, tokens_per_second=20),
            SimModel(name="s2", size_bytes=GB, load_seconds=0, tokens_per_second=20),
            SimModel(name="big", size_bytes=2 * GB, load_seconds=0.2, tokens_per_second=500),
        ],
        preloaded=["s1", "s2"],
    )
    client = sim.client()
    ended: dict[str, float] = {}

    def ask(model: str, tokens: int, delay: float = 0.0):
        time.sleep(delay)
        reply = client.generate(model=model, prompt="x", options={"num_predict": tokens})
        ended[model] = time.monotonic()
        return reply

    def watch(at: float):
        time.sleep(at)
        return sorted(sim.loaded()), sim.stats()["loads_total"]

    # s1 runs ~0.3 s, s2 ~0.8 s; big arrives at 0.05 s.
    s1, s2, big, early, middle = concurrently(
        [
            lambda: ask("s1", 6),
            lambda: ask("s2", 16),
            lambda: ask("big", 1, delay=0.05),
            lambda: watch(0.2),  # both small ones busy: nothing unloaded, big not loaded
            lambda: watch(0.5),  # s1 drained and went, s2 still runs
        ]
    )
    assert s1.done and s2.done and big.done
    assert early == (["s1:latest", "s2:latest"], 0)
    assert middle == (["s2:latest"], 0)
    assert ended["big"] - max(ended["s1"], ended["s2"]) >= 0.19  # a full load after both
    assert big.load_duration >= 190_000_000
    assert sim.loaded() == ["big:latest"]
    stats = sim.stats()
    assert (stats["loads_total"], stats["evictions_total"]) == (1, 2)
    models = stats["models"]
    assert models["s1:latest"]["evictions"] == models["s2:latest"]["evictions"] == 1


def test_without_memory_limit_only_the_count_evicts(start_sim):
    """memory_bytes None (the default): sizes do not matter, the count evicts as before."""
    names = ["m1", "m2", "m3", "m4"]
    sim = start_sim(
        max_loaded_models=3,
        models=[SimModel(name=n, size_bytes=10**15, load_seconds=0.01) for n in names],
    )
    assert sim.instance.memory_bytes is None
    client = sim.client()
    for name in names[:3]:
        client.generate(model=name, prompt="hi", options={"num_predict": 1})
    assert sorted(sim.loaded()) == ["m1:latest", "m2:latest", "m3:latest"]
    client.generate(model="m4", prompt="hi", options={"num_predict": 1})
    assert sorted(sim.loaded()) == ["m2:latest", "m3:latest", "m4:latest"]
    stats = sim.stats()
    assert (stats["loads_total"], stats["evictions_total"]) == (4, 1)


def test_model_bigger_than_memory_fails_at_once(start_sim):
    """Ollama's 500 for a model that cannot fit; nothing is evicted and the queue moves on."""
    sim = start_sim(
        memory_bytes=2 * GB,
        models=[
            SimModel(name="small", size_bytes=GB, load_seconds=0),
            SimModel(name="other", size_bytes=GB, load_seconds=0.01),
            SimModel(name="huge", size_bytes=3 * GB, load_seconds=0.01),
        ],
        preloaded=["small"],
    )
    client = sim.client(timeout=3.0)  # a hang would show as a ReadTimeout, not a pass
    started = time.monotonic()
    with pytest.raises(ollama.ResponseError) as failure:
        client.generate(model="huge", prompt="hi", options={"num_predict": 1})
    assert time.monotonic() - started < 1.0
    assert failure.value.status_code == 500
    assert failure.value.error == (
        "model requires more system memory (2.8 GiB) than is available (1.9 GiB)"
    )
    assert sim.loaded() == ["small:latest"]
    # The scheduler is not stuck: a model that fits loads next to the small one.
    client.generate(model="other", prompt="hi", options={"num_predict": 1})
    assert sorted(sim.loaded()) == ["other:latest", "small:latest"]
    stats = sim.stats()
    assert (stats["loads_total"], stats["evictions_total"], stats["errors_total"]) == (1, 0, 1)
