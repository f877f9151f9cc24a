"""The placement plan's moves on a server (``app.jobs.model_swap``): the model leaving unloaded
with keep_alive 0, the one arriving preloaded, through Ollama's own API.

What to send is a pure function, tested first; then a fleet of its own (two simulators that
hold ONE model at a time, their workers, the routers) shows the worker doing it: for a plan
published by hand, with no job at all, and for a switch the routers decide under a backlog.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from app.bench.harness import LocalFleet, free_port, own_fleet, results_of, wait_until
from app.jobs.model_swap import SETTLE_S, ModelSwap, Moves, leaving_for, moves
from app.observe.metrics import job_store
from app.state.fleet import fleet_state
from tasks import infer

A, B, C = "swap-a:latest", "swap-b:latest", "swap-c:latest"
NONE: frozenset[str] = frozenset()


def fs(*models: str) -> frozenset[str]:
    return frozenset(models)


# What to send ------------------------------------------------------------------------------


def test_a_switch_unloads_the_model_leaving_and_preloads_the_one_arriving() -> None:
    assert moves(fs(B), fs(B), fs(A), max_loaded=1) == Moves(unload=(A,), preload=(B,))


def test_a_busy_leaving_model_still_makes_room_when_nothing_is_kept() -> None:
    # Ollama queues the preload until A's running requests end, then swaps.
    assert moves(fs(B), fs(B), fs(A), 1, busy=fs(A)) == Moves((A,), (B,))


def test_no_preload_while_a_kept_model_is_idle_and_the_box_is_full() -> None:
    # Ollama would evict the idle kept A before the busy leaving C: wait until C is gone.
    assert moves(fs(A, B), fs(B), fs(A, C), 2, busy=fs(C)) == Moves((C,), ())
    # A busy too: the leaving C (keep_alive 0 sorts first) is the only victim.
    assert moves(fs(A, B), fs(B), fs(A, C), 2, busy=fs(A, C)) == Moves((C,), (B,))
    # C gone: room.
    assert moves(fs(A, B), fs(B), fs(A), 2) == Moves((), (B,))


def test_nothing_is_unloaded_when_the_arriving_model_fits_beside_it() -> None:
    assert moves(fs(B), fs(B), fs(A), 3) == Moves((), (B,))


def test_a_model_the_plan_only_keeps_is_never_touched() -> None:
    assert moves(fs(A), NONE, fs(A), 1) == Moves()
    assert moves(fs(A), NONE, NONE, 1) == Moves()  # unloaded by someone: not a switch
    assert moves(fs(B), NONE, fs(A), 1) == Moves()  # nothing arriving: no eviction


def test_no_preload_for_a_model_a_running_job_loads_or_one_already_sent() -> None:
    assert moves(fs(B), fs(B), NONE, 1, busy=fs(B)) == Moves()
    assert moves(fs(B), fs(B), NONE, 1, sent=fs(B)) == Moves()
    assert moves(fs(B), fs(B), fs(B), 1) == Moves()  # loaded: done


def test_one_preload_at_a_time_within_the_room() -> None:
    assert moves(fs(B, C), fs(B, C), NONE, 2) == Moves((), (B,))
    assert moves(fs(B, C), fs(B, C), NONE, 2, sent=fs(B)) == Moves((), (C,))
    assert moves(fs(A, B, C), fs(B, C), fs(A), 2, busy=fs(A), sent=fs(B)) == Moves()


class FakeClient:
    """Records what the worker sends; a preload returns when ``release`` is set."""

    def __init__(self) -> None:
        self.unloads: list[str] = []
        self.preloads: list[str] = []
        self.release = threading.Event()

    def unload(self, model: str, timeout: float) -> None:
        self.unloads.append(model)

    def preload(self, model: str, timeout: float) -> str:
        self.preloads.append(model)
        self.release.wait(5)
        return "generate"


def test_a_switch_is_acted_on_once_settled_and_read_twice_and_sent_once() -> None:
    swap, client = ModelSwap("x"), FakeClient()

    def step(switched: dict[str, float], now: float, loaded: frozenset[str] = fs(A)) -> Moves:
        return swap.step((fs(B), switched), loaded, 1, NONE, client, 10.0, now=now)  # type: ignore[arg-type]

    assert step({B: 100.0}, now=100.5) == Moves()  # not settled yet
    assert step({B: 100.0}, now=100.0 + SETTLE_S) == Moves((A,), (B,))
    assert client.unloads == [A] and client.preloads == [B]
    client.release.set()
    wait_until(lambda: not swap.preloading, 5, "the preload answered")
    # Later heartbeats, A still loaded (its jobs running): nothing is sent again.
    assert step({B: 100.0}, now=103.0) == Moves()
    assert client.unloads == [A] and client.preloads == [B]


def test_a_switch_another_router_does_not_make_is_not_acted_on() -> None:
    swap, client = ModelSwap("x"), FakeClient()
    client.release.set()
    plans = [{B: 100.0}, {}, {B: 100.0}, {B: 100.7}]  # two routers publishing in turn
    for i, switched in enumerate(plans):
        swap.step((fs(B), switched), fs(A), 1, NONE, client, 10.0, now=103.0 + i)  # type: ignore[arg-type]
    assert client.unloads == [] and client.preloads == []


def test_a_job_loading_its_model_on_a_full_server_evicts_what_the_plan_gave_up() -> None:
    assert leaving_for(C, fs(A, C), fs(A, B), max_loaded=2) == (B,)
    assert leaving_for(C, fs(A, B, C), fs(A, B), 2) == ()  # the plan keeps both: Ollama picks
    assert leaving_for(C, fs(C), fs(A), 2) == ()  # room beside A
    assert leaving_for(A, fs(C), fs(A, B), 2) == ()  # loaded already


GIB = 1024**3
#: A 10 GiB server: A and C fit together (9 GiB), A, B and C do not (13 GiB), though it may
#: hold three models.
SIZES = {A: 2.0 * GIB, B: 4.0 * GIB, C: 7.0 * GIB}
MEMORY = 10.0 * GIB


def test_a_model_arriving_that_does_not_fit_in_memory_unloads_the_one_leaving() -> None:
    # B leaving, A kept, C arriving: the count alone leaves room for C, and Ollama would evict.
    assert moves(fs(A, C), fs(C), fs(A, B), 3) == Moves((), (C,))
    fit = {"memory": MEMORY, "sizes": SIZES}
    # A idle: Ollama would evict it rather than the busy B, so no preload yet.
    assert moves(fs(A, C), fs(C), fs(A, B), 3, busy=fs(B), **fit) == Moves((B,), ())  # type: ignore[arg-type]
    assert moves(fs(A, C), fs(C), fs(A, B), 3, busy=fs(A, B), **fit) == Moves((B,), (C,))  # type: ignore[arg-type]
    assert moves(fs(A, C), fs(C), fs(A), 3, **fit) == Moves((), (C,))  # type: ignore[arg-type]
    # A size nobody reported counts 0: the count alone decides.
    assert moves(fs(A, C), fs(C), fs(A, B), 3, memory=MEMORY) == Moves((), (C,))


def test_a_job_loading_a_model_that_does_not_fit_in_memory_evicts_what_the_plan_gave_up() -> None:
    assert leaving_for(C, fs(A, C), fs(A, B), 3) == ()  # the count alone: room
    assert leaving_for(C, fs(A, C), fs(A, B), 3, MEMORY, SIZES) == (B,)
    assert leaving_for(C, fs(A, C), fs(A), 3, MEMORY, SIZES) == ()  # fits beside A


def _a_and_b_until_b_is_unloaded(client: FakeClient) -> Callable[[], frozenset[str]]:
    """What /api/ps lists: A and B, then (B's last request ended once it was sent keep_alive
    0) A and whatever was preloaded."""

    def loaded() -> frozenset[str]:
        return fs(A) | fs(*client.preloads) if client.unloads else fs(A, B)

    return loaded


def test_make_room_and_an_urgent_switch_make_room_in_memory_where_the_count_has_it() -> None:
    """A kept, B leaving, C arriving on a server that may hold three: the count leaves room
    for C, the memory does not (B must go first)."""
    fit = {"memory": MEMORY, "sizes": SIZES}
    swap, client = ModelSwap("x"), FakeClient()
    assert swap.make_room(C, fs(A, C), 3, client, lambda: fs(A, B), lambda: fs(C)) == ()  # type: ignore[arg-type]
    assert client.unloads == []  # the count alone: nothing to unload
    reads = iter([fs(A, B), fs(A, B), fs(A)])  # B's last request ends at the third look
    got = swap.make_room(C, fs(A, C), 3, client, lambda: next(reads), lambda: fs(C), **fit)  # type: ignore[arg-type]
    assert got == (B,) and client.unloads == [B] and next(reads, None) is None

    swap, client = ModelSwap("x"), FakeClient()
    client.release.set()
    loaded = _a_and_b_until_b_is_unloaded(client)

    # Urgent: B unloaded for memory before C is preloaded.
    got_switch = swap.switch_now(C, fs(A, C), fs(C), 3, lambda: NONE, client, loaded, 10.0, **fit)  # type: ignore[arg-type]
    assert got_switch == C and client.unloads == [B] and client.preloads == [C]


def test_make_room_unloads_the_model_leaving_and_waits_until_it_left() -> None:
    swap, client = ModelSwap("x"), FakeClient()
    reads = iter([fs(A, B), fs(A, B), fs(A)])  # B's last request ends at the third look
    assert swap.make_room(C, fs(A, C), 2, client, lambda: next(reads), lambda: fs(C)) == (B,)  # type: ignore[arg-type]
    assert client.unloads == [B] and next(reads, None) is None
    # A second job of C meanwhile: B is not sent keep_alive 0 twice.
    assert swap.make_room(C, fs(A, C), 2, client, lambda: fs(A), lambda: fs(C)) == ()  # type: ignore[arg-type]
    assert client.unloads == [B]


def test_make_room_counts_a_model_still_loading_as_held() -> None:
    """B is loading (a job of it runs, /api/ps does not list it yet) and the plan moved it
    off: no room until it showed loaded, was unloaded and left."""
    swap, client = ModelSwap("x"), FakeClient()
    reads = iter([fs(A), fs(A), fs(A, B), fs(A, B), fs(A)])
    busy = iter([fs(B, C), fs(B, C), fs(B, C), fs(C), fs(C)])
    got = swap.make_room(C, fs(A, C), 2, client, lambda: next(reads), lambda: next(busy))  # type: ignore[arg-type]
    assert got == (B,) and client.unloads == [B] and next(reads, None) is None


def test_an_urgent_switch_makes_room_and_preloads_at_once() -> None:
    swap, client = ModelSwap("x"), FakeClient()
    client.release.set()
    loaded = _a_and_b_until_b_is_unloaded(client)

    # B leaves, C arrives, not settled: sent now, B unloaded before C is preloaded.
    assert swap.switch_now(C, fs(A, C), fs(C), 2, lambda: fs(A), client, loaded, 10.0) == C  # type: ignore[arg-type]
    assert client.unloads == [B] and client.preloads == [C]
    # The heartbeat that follows sends neither again.
    assert swap.step((fs(A, C), {C: 100.0}), fs(A, C), 2, NONE, client, 10.0, now=110.0) == Moves()  # type: ignore[arg-type]
    assert swap.switch_now(C, fs(A, C), fs(C), 2, lambda: NONE, client, loaded, 10.0) is None  # type: ignore[arg-type]
    assert client.unloads == [B] and client.preloads == [C]


def test_a_job_goes_at_once_behind_its_own_preload_and_after_another_model_s() -> None:
    """Ollama loads one model at a time, its queue in order: a job of C, which a preload is
    loading, goes at once; so does a job of A, loaded (it skips Ollama's queue); a job of B,
    not loaded, waits until that preload is answered."""
    swap, client = ModelSwap("x"), FakeClient()
    swap.preloading.add(C)

    def unread() -> frozenset[str]:
        raise AssertionError("no need to look at /api/ps")

    assert swap.make_room(C, fs(B, C), 2, client, unread, unread) == ()  # type: ignore[arg-type]
    assert swap.make_room(A, fs(A, C), 2, client, lambda: fs(A), lambda: NONE) == ()  # type: ignore[arg-type]
    assert swap.preloading == {C}  # it did not wait for the preload
    preloading_at_reads: list[bool] = []

    def loaded() -> frozenset[str]:
        preloading_at_reads.append(bool(swap.preloading))
        return NONE

    threading.Timer(0.3, swap.preloading.discard, (C,)).start()
    assert swap.make_room(B, fs(B, C), 2, client, loaded, lambda: NONE) == ()  # type: ignore[arg-type]
    assert preloading_at_reads == [True, False]


def test_an_urgent_switch_loads_the_model_nudged_for_and_shows_the_load() -> None:
    """B and C both arrive on an empty box that holds two; the nudge is for C (its jobs are
    urgent): C is preloaded, not B first (Ollama loads one model at a time), and the load
    is shown while it runs."""
    shown: list[tuple[str, bool]] = []
    swap = ModelSwap("x", show_loading=lambda m, since: shown.append((m, since is not None)))
    client = FakeClient()
    client.release.set()
    got = swap.switch_now(C, fs(B, C), fs(B, C), 2, lambda: NONE, client, lambda: NONE, 10.0)  # type: ignore[arg-type]
    assert got == C and client.preloads == [C]
    assert shown == [(C, True), (C, False)]
    # A nudge for a model the plan no longer moves here: nothing.
    assert (
        swap.switch_now(A, fs(B, C), fs(B, C), 2, lambda: NONE, client, lambda: NONE, 10.0) is None
    )  # type: ignore[arg-type]
    assert client.preloads == [C]


# With real processes -----------------------------------------------------------------------

LOAD_S, SERVICE_S, PARALLELISM = 0.5, 0.25, 2


def _model(name: str) -> dict[str, object]:
    return {
        "name": name,
        "kind": "chat",
        "tokens_per_second": 10 / SERVICE_S,
        "prompt_tokens_per_second": 0.0,
        "default_num_predict": 10,
        "load_seconds": LOAD_S,
    }


@pytest.fixture(scope="module")
def swap_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """Two simulators of parallelism 2 that hold one model at a time, both holding A."""
    sims = [
        {
            "name": name,
            "port": free_port(),
            "num_parallel": PARALLELISM,
            "max_loaded_models": 1,
            "parallel_slowdown": 0.0,
            "preloaded": [A],
            "models": [_model(A), _model(B)],
        }
        for name in ("swap-x", "swap-y")
    ]
    workdir: Path = tmp_path_factory.mktemp("swap")
    with own_fleet(workdir, sims, CORRAL_NAMESPACE=f"swap{os.getpid()}") as fleet:
        yield fleet


def _ps(fleet: LocalFleet, name: str) -> set[str]:
    models = requests.get(fleet.sim_urls[name] + "/api/ps", timeout=5).json()["models"]
    return {m["model"] for m in models}


def _sent(metric: str, **labels: str) -> float:
    """A counter of the job metrics (summed in Redis) over the label sets that match."""
    total = 0.0
    for family in job_store().collect():
        for sample in family.samples:
            if sample.name == metric and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def _back_to_a(fleet: LocalFleet) -> None:
    """Both boxes holding A again, no plan, counters zeroed."""
    fleet_state().placement.clear()
    for url in fleet.sim_urls.values():
        requests.post(url + "/api/generate", json={"model": A}, timeout=10).raise_for_status()
    wait_until(lambda: all(_ps(fleet, n) == {A} for n in fleet.sim_urls), 10, "A everywhere")
    fleet.reset_sims()


def test_a_published_switch_unloads_and_preloads_without_any_job(swap_fleet: LocalFleet) -> None:
    _back_to_a(swap_fleet)
    unloads = _sent("corral_model_unloads_sent_total", instance="swap-x", model=A)
    preloads = _sent("corral_model_preloads_sent_total", instance="swap-x", model=B)
    # The plan as a router would publish it: swap-x switched to B, swap-y keeps A. A switch
    # is acted on once it is SETTLE_S old.
    fleet_state().placement.publish(
        {"swap-x": [B], "swap-y": [A]}, ttl_s=30, arriving={"swap-x": {B: time.time()}}
    )
    time.sleep(SETTLE_S / 2)
    assert _ps(swap_fleet, "swap-x") == {A}
    try:
        wait_until(lambda: _ps(swap_fleet, "swap-x") == {B}, SETTLE_S + 5, "swap-x to hold B")
        stats = swap_fleet.sim_stats("swap-x")
        assert stats["loads_total"] == 1 and stats["models"][B]["loads"] == 1
        # One unload and one preload: nothing ran on a slot.
        assert stats["requests_total"] == 2 and stats["peak_active"] == 0
        wait_until(
            lambda: (
                _sent("corral_model_preloads_sent_total", instance="swap-x", model=B) > preloads
            ),
            5,
            "the preload counted",
        )
        assert _sent("corral_model_unloads_sent_total", instance="swap-x", model=A) == unloads + 1
        # Sent once for the switch: later heartbeats (0.5 s) send nothing more.
        time.sleep(1.5)
        assert swap_fleet.sim_stats("swap-x")["requests_total"] == 2
        assert _ps(swap_fleet, "swap-y") == {A}
        assert swap_fleet.sim_stats("swap-y")["requests_total"] == 0
    finally:
        fleet_state().placement.clear()


def test_a_switch_while_the_model_leaving_still_runs(swap_fleet: LocalFleet) -> None:
    """Four long jobs of A fill both boxes; B's backlog takes one of them (a switch decided by
    the routers' plan while A's jobs still run there). Once the switch settled, that box's
    worker sends keep_alive 0 for A and a preload of B: A leaves when its jobs end, B loads
    without waiting for a job of B to ask. Nothing is lost, no slot is oversubscribed, and no
    box swaps back and forth."""
    _back_to_a(swap_fleet)
    unloads = _sent("corral_model_unloads_sent_total", model=A)
    preloads = _sent("corral_model_preloads_sent_total", model=B, outcome="loaded")
    long = {"num_predict": 120}  # 3 s at 40 tokens/s
    jobs = [infer.delay(model=A, prompt=f"a {i}", options=long) for i in range(4)]
    wait_until(
        lambda: all(swap_fleet.sim_stats(n)["active"] == 2 for n in swap_fleet.sim_urls),
        10,
        "A's jobs running on both boxes",
    )
    jobs += [infer.delay(model=B, prompt=f"b {i}", tier="batch") for i in range(30)]
    results = results_of(jobs, timeout=60)
    assert [r.model for r in results] == [A] * 4 + [B] * 30
    for name in swap_fleet.sim_urls:
        stats = swap_fleet.sim_stats(name)
        assert stats["peak_active"] <= PARALLELISM, (name, stats)
        # A preload or an unload is a request inside the server that holds no slot.
        assert stats["peak_in_flight"] <= PARALLELISM + 1, (name, stats)
        assert stats["errors_total"] == 0 and stats["rejected_total"] == 0
    wait_until(
        lambda: (
            _sent("corral_model_unloads_sent_total", model=A) > unloads
            and _sent("corral_model_preloads_sent_total", model=B, outcome="loaded") > preloads
        ),
        5,
        "an unload of A and a preload of B counted",
    )
    # B on one box, then on the other once A's jobs are done: never back to A.
    stats = [swap_fleet.sim_stats(n) for n in swap_fleet.sim_urls]
    assert sum(s["models"].get(A, {}).get("loads", 0) for s in stats) == 0, stats
    assert sum(s["loads_total"] for s in stats) <= 2, stats
