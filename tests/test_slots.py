"""The slot protocol in Redis (real Redis, no broker): capacity, hand-off order, leases."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from app.settings import InstanceConfig, get_settings
from app.state import keys
from app.state.fleet import DONE, FleetState, redis_client

M = "m:latest"


@pytest.fixture
def fleet() -> Iterator[FleetState]:
    state = FleetState(redis_client(get_settings().redis_url), f"slots-{uuid.uuid4().hex[:8]}")
    for name in ("a", "b"):
        state.instances.register(InstanceConfig(name=name, url=f"http://{name}", models=[M]))
    yield state
    for key in state.redis.scan_iter(keys.everything(state.ns)):
        state.redis.delete(key)


def acquire(fleet: FleetState, job: str, score: float = 0.0, cands=("a",), exclude=()) -> str:
    return fleet.slots.acquire(job, M, score=score, candidates=list(cands), exclude=list(exclude))


def in_flight(fleet: FleetState, name: str) -> int:
    return int(fleet.redis.hget(keys.instance(fleet.ns, name), "in_flight"))


def test_never_more_grants_than_capacity(fleet: FleetState) -> None:
    assert acquire(fleet, "j1") == "a"
    assert acquire(fleet, "j2") == "a"
    assert acquire(fleet, "j3") is None
    assert in_flight(fleet, "a") == 2 and fleet.slots.waiting(M) == 1


def test_acquire_is_idempotent_per_job(fleet: FleetState) -> None:
    assert acquire(fleet, "j1") == "a"
    assert acquire(fleet, "j1", cands=("b",)) == "a"
    assert in_flight(fleet, "a") == 1 and in_flight(fleet, "b") == 0


def test_finishing_hands_the_slot_to_the_most_urgent_waiter(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    acquire(fleet, "j2")
    assert acquire(fleet, "batch", score=2e11) is None
    assert acquire(fleet, "urgent", score=1e9) is None
    assert fleet.slots.finish("j1", "a", ok=True, model=M, service_ms=10) == "urgent"
    assert fleet.slots.wait_handoff("urgent", 1) == "a"
    assert in_flight(fleet, "a") == 2
    assert acquire(fleet, "urgent") == "a"  # the router's retry sees the grant it holds


def test_hand_off_skips_waiters_that_excluded_the_instance(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    acquire(fleet, "j2")
    acquire(fleet, "picky", score=1.0, exclude=["a"])
    acquire(fleet, "easy", score=2.0)
    assert fleet.slots.finish("j1", "a", ok=True, model=M) == "easy"


def test_hand_off_follows_the_latest_placement_plan(fleet: FleetState) -> None:
    other = "o:latest"
    fleet.instances.register(InstanceConfig(name="a", url="http://a", models=[M, other]))
    acquire(fleet, "j1")
    acquire(fleet, "j2")
    assert fleet.slots.acquire("early", M, score=1.0, candidates=["a"], exclude=[]) is None
    assert fleet.slots.acquire("late", other, score=2.0, candidates=["a"], exclude=[]) is None
    # The plan moved a off M since "early" last looked: the slot goes to "late".
    fleet.placement.publish({"a": [other], "b": [M]}, ttl_s=10)
    assert fleet.slots.finish("j1", "a", ok=True, model=M) == "late"
    # No current plan: no filter.
    fleet.placement.clear()
    assert fleet.slots.finish("j2", "a", ok=True, model=M) == "early"


def test_an_idle_box_the_plan_moves_a_model_onto_is_offered_to_that_models_waiters(
    fleet: FleetState,
) -> None:
    """No job frees a slot on an idle box: ``offer`` hands its slots to the waiters of the
    models the plan just moved there, best first, never beyond its parallelism, and to no
    waiter of another model or one that excluded the box."""
    other = "o:latest"
    fleet.instances.register(InstanceConfig(name="a", url="http://a", models=[M, other]))
    fleet.placement.publish({"a": [other], "b": [M]}, ttl_s=10)
    for job, score in (("j1", 3.0), ("j2", 1.0), ("j3", 2.0), ("picky", 0.5)):
        exclude = ["a"] if job == "picky" else []
        assert fleet.slots.acquire(job, M, score=score, candidates=[], exclude=exclude) is None
    assert fleet.slots.acquire("o1", other, score=0.1, candidates=[], exclude=[]) is None
    assert fleet.slots.offer({"a": [M]}) == 0  # the plan does not hold M on a yet
    fleet.placement.publish({"a": [M], "b": [M]}, ttl_s=10)
    assert fleet.slots.offer({"a": [M]}) == 2
    assert fleet.slots.wait_handoff("j2", 1) == "a" and fleet.slots.wait_handoff("j3", 1) == "a"
    assert in_flight(fleet, "a") == 2 and fleet.slots.waiting(M) == 2
    assert fleet.slots.offer({"a": [M]}) == 0 and in_flight(fleet, "a") == 2  # full
    fleet.slots.finish("j2", "a", ok=True, model=M)  # hands its slot on: to j1
    assert fleet.slots.wait_handoff("j1", 1) == "a"
    fleet.slots.finish("j1", "a", ok=True, model=M)
    assert fleet.slots.offer({"a": [M]}) == 0 and in_flight(fleet, "a") == 1  # only picky left
    assert fleet.slots.offer({"gone": [M]}) == 0


def test_a_plan_built_on_one_that_is_no_longer_the_latest_is_not_published(
    fleet: FleetState,
) -> None:
    assert fleet.placement.publish({"a": [M]}, ttl_s=10, by="r1", at=5.0, based_on=None)
    assert fleet.placement.publish({"a": [M]}, ttl_s=10, by="r2", at=6.0, based_on=("r1", 5.0))
    # r3 built on r1's plan too: r2's stays.
    assert not fleet.placement.publish({"b": [M]}, ttl_s=10, by="r3", at=7.0, based_on=("r1", 5.0))
    assert not fleet.placement.publish({"b": [M]}, ttl_s=10, by="r3", at=7.0, based_on=None)
    latest = fleet.placement.latest()
    assert latest is not None and (latest.by, latest.at, latest.hold) == ("r2", 6.0, {"a": [M]})


def test_the_published_plan_reads_back_and_an_old_string_plan_filters_nothing(
    fleet: FleetState,
) -> None:
    fleet.placement.publish({"a": [M, "o:latest"], "b": []}, ttl_s=10, by="r1", at=5.0)
    latest = fleet.placement.latest()
    assert latest is not None and latest.by == "r1" and latest.at == 5.0
    assert latest.hold == {"a": [M, "o:latest"], "b": []} == fleet.placement.read()
    assert fleet.placement.moves("a") == (frozenset({M, "o:latest"}), {})
    assert fleet.placement.moves("c") is None
    fleet.placement.publish({}, ttl_s=10)  # nothing up: no plan
    assert fleet.placement.latest() is None and fleet.placement.read() is None
    # A plan as an older Corral wrote it (one JSON string), met during a rolling upgrade.
    acquire(fleet, "j1")
    acquire(fleet, "j2")
    assert fleet.slots.acquire("w", M, score=1.0, candidates=["a"], exclude=[]) is None
    fleet.redis.set(keys.placement(fleet.ns), '{"a": ["o:latest"]}')
    assert fleet.slots.finish("j1", "a", ok=True, model=M) == "w"


def test_finish_is_idempotent_and_frees_the_slot(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    assert fleet.slots.finish("j1", "a", ok=True, model=M) is None
    fleet.slots.finish("j1", "a", ok=True, model=M)
    assert in_flight(fleet, "a") == 0
    assert acquire(fleet, "j1") == DONE


def test_confirm_guards_against_duplicates_and_stale_grants(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    assert fleet.slots.confirm("j1", "b", "w1") == "nogrant"
    assert fleet.slots.confirm("j1", "a", "w1") == "ok"
    assert fleet.slots.confirm("j1", "a", "w1") == "dup"
    assert fleet.slots.confirm("j1", "a", "w2-after-restart") == "ok"
    fleet.slots.finish("j1", "a", ok=True, model=M)
    assert fleet.slots.confirm("j1", "a", "w2-after-restart") == "done"


def breaker(fleet: FleetState, name: str) -> str:
    return fleet.breaker.state(name)


def test_refused_connection_opens_the_breaker_at_once(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    fleet.slots.finish("j1", "a", ok=False, model=M, open_breaker=True)
    stats = {i.name: i for i in fleet.instances.snapshot().instances}
    assert breaker(fleet, "a") == "open" and stats["a"].recent_errors == 1
    assert not stats["a"].up(time.time())
    assert acquire(fleet, "j2") is None  # no job while open


def test_breaker_opens_after_failures_in_a_row_then_probes_then_closes(
    fleet: FleetState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_DOWN_COOLDOWN", "0")
    get_settings.cache_clear()
    try:
        for i in range(3):
            assert breaker(fleet, "a") == "closed"
            acquire(fleet, f"f{i}")
            fleet.slots.finish(f"f{i}", "a", ok=False, model=M)
        assert breaker(fleet, "a") == "open"
        # Cooldown over: one probe at a time (half-open), never the full parallelism.
        assert acquire(fleet, "probe") == "a"
        assert breaker(fleet, "a") == "half_open"
        assert acquire(fleet, "second") is None
        fleet.slots.finish("probe", "a", ok=False, model=M)  # the probe failed: open again
        assert breaker(fleet, "a") == "open"
        assert acquire(fleet, "probe2") == "a"
        # The probe's success closes it, and the freed slot goes to the waiting job.
        assert fleet.slots.finish("probe2", "a", ok=True, model=M) == "second"
        assert breaker(fleet, "a") == "closed"
        assert acquire(fleet, "second") == "a" and acquire(fleet, "third") == "a"
    finally:
        get_settings.cache_clear()


def test_expired_leases_are_reclaimed(fleet: FleetState) -> None:
    fleet.slots.acquire("ghost", M, score=0, candidates=["a"], exclude=[], now=time.time() - 3600)
    assert in_flight(fleet, "a") == 1
    assert fleet.slots.reclaim_expired() == 1
    assert in_flight(fleet, "a") == 0


def test_ewma_service_time_is_recorded_per_model(fleet: FleetState) -> None:
    for ms in (100.0, 200.0):
        acquire(fleet, f"j{ms}")
        fleet.slots.finish(f"j{ms}", "a", ok=True, model=M, service_ms=ms)
    a = next(i for i in fleet.instances.snapshot().instances if i.name == "a")
    assert a.model_ewma_ms[M] == pytest.approx(120.0)


def test_running_jobs_reclaim_grants_that_redis_lost(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    fleet.redis.delete(keys.grants(fleet.ns))  # as after a Redis restart without persistence
    fleet.redis.hset(keys.instance(fleet.ns, "a"), "in_flight", 0)
    fleet.slots.hold("a", "worker-token", ["j1"])
    assert in_flight(fleet, "a") == 1
    fleet.slots.hold("a", "worker-token", ["j1"])  # idempotent
    assert in_flight(fleet, "a") == 1
    assert fleet.slots.finish("j1", "a", ok=True, model=M) is None
    assert in_flight(fleet, "a") == 0


def test_a_revoked_job_stops_waiting_and_frees_its_slot(fleet: FleetState) -> None:
    acquire(fleet, "j1")
    acquire(fleet, "j2")
    assert acquire(fleet, "waiting") is None
    fleet.slots.forget("waiting", M)
    assert fleet.slots.waiting(M) == 0
    fleet.slots.forget("j1", M)
    assert in_flight(fleet, "a") == 1


def test_a_class_at_its_cap_waits_while_others_get_free_slots(fleet: FleetState) -> None:
    def heavy(job: str, score: float = 0.0) -> str | None:
        return fleet.slots.acquire(
            job,
            M,
            score=score,
            candidates=["a", "b"],
            exclude=[],
            agent_class="heavy",
            class_cap=1,
        )

    assert heavy("h1") is not None
    assert heavy("h2", score=1.0) is None  # slots are free, but heavy holds its 1
    assert acquire(fleet, "light", cands=("a", "b")) is not None  # another class is not held
    # When h1 ends, its slot goes to h2 (the class is back under its cap), not idle.
    holder = fleet.slots.holder("h1")
    assert fleet.slots.finish("h1", holder, ok=True, model=M) == "h2"
    assert fleet.classes.in_flight("heavy") == 1
    fleet.slots.forget("h2", M)
    assert fleet.classes.in_flight("heavy") == 0


def test_a_capped_waiter_is_skipped_in_a_hand_off_while_its_class_is_full(
    fleet: FleetState,
) -> None:
    def job(name: str, score: float, cap: int) -> str | None:
        return fleet.slots.acquire(
            name,
            M,
            score=score,
            candidates=["a"],
            exclude=[],
            agent_class="heavy" if cap else "x",
            class_cap=cap,
        )

    assert job("h1", 0.0, 1) == "a"
    assert job("x1", 0.0, 0) == "a"  # instance a is now full
    assert job("h2", 1.0, 1) is None  # waits: heavy is full (and so is a)
    assert job("x2", 2.0, 0) is None  # waits behind h2 by score
    # x1 ends: h2 is first in line, but heavy still holds its 1: the slot goes to x2.
    assert fleet.slots.finish("x1", "a", ok=True, model=M) == "x2"


def test_a_slot_counter_that_drifted_from_its_grants_is_set_right(fleet: FleetState) -> None:
    assert acquire(fleet, "j1") == "a"
    fleet.redis.hset(keys.instance(fleet.ns, "a"), "in_flight", 2)  # as after keys lost mid-job
    assert fleet.slots.reconcile("a") == 2
    assert in_flight(fleet, "a") == 1
    assert fleet.slots.reconcile("a") is None  # nothing to fix


def test_an_instance_rate_limit_holds_its_grants_to_the_rate(fleet: FleetState) -> None:
    # 12 a minute: a burst of 2 (ten seconds' worth), then one every 5 s.
    fleet.instances.register(
        InstanceConfig(name="a", url="http://a", models=[M], rate_limit_per_minute=12)
    )
    t = 1000.0

    def grant(job: str, at: float) -> str | None:
        return fleet.slots.acquire(job, M, score=at, candidates=["a", "b"], exclude=[], now=at)

    assert grant("j1", t) == "a"
    fleet.slots.finish("j1", "a", ok=True, model=M)
    assert grant("j2", t) == "a"
    fleet.slots.finish("j2", "a", ok=True, model=M)
    # Slots are free, but the bucket is empty: the next candidate gets the job.
    assert grant("j3", t + 1) == "b"
    assert grant("j4", t + 5.1) == "a"  # one token back after 5 s
    assert in_flight(fleet, "a") == 1 and in_flight(fleet, "b") == 1


def test_a_hand_off_waits_for_the_instance_rate_limit(fleet: FleetState) -> None:
    fleet.instances.register(
        InstanceConfig(name="a", url="http://a", models=[M], rate_limit_per_minute=6)
    )
    now = time.time()
    assert fleet.slots.acquire("j1", M, score=0, candidates=["a"], exclude=[], now=now) == "a"
    # The burst (one token at 6 a minute) is spent: the waiter is not handed the freed slot,
    # which stays free for whoever finds a token first.
    assert fleet.slots.acquire("w", M, score=1, candidates=["a"], exclude=[], now=now) is None
    assert fleet.slots.finish("j1", "a", ok=True, model=M) is None
    assert in_flight(fleet, "a") == 0 and fleet.slots.waiting(M) == 1


def test_steps_sharing_a_round_trip_survive_redis_losing_its_scripts(fleet: FleetState) -> None:
    # As after a Redis restart: the pipelined steps load the scripts again and run once more.
    assert acquire(fleet, "j1") == "a"
    fleet.redis.script_flush()
    verdict, stats = fleet.start_job("j1", "a", "w1", M)
    assert verdict == "ok" and stats["ttft"] is None
    fleet.redis.script_flush()
    timing = {f"ttft:{M}": 0.25}
    assert fleet.slots.finish("j1", "a", ok=True, model=M, service_ms=5, timing=timing) is None
    assert in_flight(fleet, "a") == 0
    assert fleet.instances.silence_stats("a", M)["ttft"] == pytest.approx(0.25)
