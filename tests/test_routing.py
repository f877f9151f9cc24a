"""The routing policy, as pure functions: no broker, no Redis."""

from __future__ import annotations

from routing import STRATEGIES, FleetSnapshot, InstanceStats, rank
from routing.ranking import worth_starting

M = "llama3.2:3b"


def inst(name: str, **kw) -> InstanceStats:
    base = {"capacity": 2, "models": frozenset({M}), "loaded": frozenset({M})}
    return InstanceStats(name=name, **{**base, **kw})


def snap(*instances: InstanceStats, now: float = 100.0) -> FleetSnapshot:
    return FleetSnapshot(tuple(instances), now)


def names(choices) -> list[str]:
    return [c.instance for c in choices]


def test_only_instances_serving_the_model_that_are_up_and_enabled() -> None:
    s = snap(
        inst("a"),
        inst("b", models=frozenset({"other:latest"})),
        inst("c", enabled=False),
        inst("d", healthy=False),
        inst("e", down_until=150.0),
        inst("f", expires_at=99.0),
    )
    for strategy in STRATEGIES:
        assert names(rank(s, M, strategy=strategy)) == ["a"], strategy


def test_excluded_instances_are_used_only_when_nothing_else_is_left() -> None:
    s = snap(inst("a"), inst("b"))
    assert names(rank(s, M, exclude=["a"])) == ["b"]
    assert names(rank(s, M, exclude=["a", "b"])) in (["a", "b"], ["b", "a"])


def test_no_eligible_instance_means_wait() -> None:
    assert rank(snap(inst("a", healthy=False)), M) == []
    assert rank(snap(inst("a")), "unknown:latest") == []


def test_least_connections_prefers_free_slots_and_rotates_ties() -> None:
    s = snap(inst("a", in_flight=2), inst("b", in_flight=1), inst("c", in_flight=1))
    firsts = {names(rank(s, M, tick=t))[0] for t in range(6)}
    assert firsts == {"b", "c"}
    assert names(rank(s, M, tick=0))[-1] == "a"


def test_least_connections_uses_the_fraction_of_capacity_in_use() -> None:
    s = snap(inst("small", capacity=1, in_flight=1), inst("big", capacity=8, in_flight=3))
    assert names(rank(s, M))[0] == "big"


def test_round_robin_cycles_through_every_instance() -> None:
    s = snap(inst("a"), inst("b"), inst("c"))
    assert [names(rank(s, M, strategy="round_robin", tick=t))[0] for t in range(3)] == [
        "a",
        "b",
        "c",
    ]


def test_weighted_gives_heavier_instances_more() -> None:
    s = snap(inst("light", weight=1.0, in_flight=1), inst("heavy", weight=3.0, in_flight=1))
    assert names(rank(s, M, strategy="weighted"))[0] == "heavy"


def test_response_time_prefers_the_faster_instance_for_this_model() -> None:
    s = snap(inst("slow", model_ewma_ms={M: 900.0}), inst("fast", model_ewma_ms={M: 100.0}))
    assert names(rank(s, M, strategy="response_time")) == ["fast", "slow"]


def test_smart_avoids_a_cold_load_and_records_its_reasons() -> None:
    s = FleetSnapshot(
        (inst("cold", loaded=frozenset(), ewma_ms=100.0), inst("hot", ewma_ms=150.0)),
        100.0,
        backlog={M: 500},  # enough work that the cold box is worth loading
    )
    choices = rank(s, M, strategy="smart")
    assert names(choices) == ["hot", "cold"]
    assert choices[1].score["cold_ms"] > 0 and choices[0].score["cold_ms"] == 0


def test_smart_takes_a_free_slow_box_only_while_the_backlog_is_deep() -> None:
    fleet = (inst("fast", ewma_ms=100.0, in_flight=2), inst("slow", ewma_ms=400.0))
    # 20 jobs ahead: the fast box (2 slots, 100 ms) needs 1 s for them; the slow one 400 ms.
    deep = FleetSnapshot(fleet, 100.0, backlog={M: 20})
    assert names(rank(deep, M, strategy="smart")) == ["slow", "fast"]
    # The last job of a batch finishes sooner by waiting for the fast box.
    last = FleetSnapshot(fleet, 100.0, backlog={M: 0})
    assert names(rank(last, M, strategy="smart")) == ["fast"]


def test_smart_loads_a_cold_model_only_for_enough_work() -> None:
    fleet = (inst("warm", ewma_ms=200.0), inst("cold", ewma_ms=200.0, loaded=frozenset()))
    # A 5 s load pays when the warm box alone would need longer than that for the backlog.
    assert names(rank(FleetSnapshot(fleet, 100.0, backlog={M: 3}), M, strategy="smart")) == ["warm"]
    assert names(rank(FleetSnapshot(fleet, 100.0, backlog={M: 200}), M, strategy="smart")) == [
        "warm",
        "cold",
    ]


def test_worth_starting_never_leaves_a_model_with_no_instance() -> None:
    lone = [inst("slow", ewma_ms=5000.0, loaded=frozenset())]
    assert worth_starting(lone, M, backlog=0) == {"slow"}


def test_smart_penalises_recent_errors() -> None:
    s = snap(inst("flaky", ewma_ms=100.0, recent_errors=4), inst("steady", ewma_ms=150.0))
    assert names(rank(s, M, strategy="smart"))[0] == "steady"


def test_higher_priority_levels_come_first_in_every_strategy() -> None:
    backup = inst("backup", priority=2)
    primary = inst("primary", priority=8, in_flight=1)
    for strategy in STRATEGIES:
        ranked = names(rank(snap(backup, primary), M, strategy=strategy, tick=1))
        assert ranked[0] == "primary", strategy
    # Within one level the strategy decides: the less loaded of two primaries first.
    other = inst("primary-2", priority=8)
    assert names(rank(snap(backup, primary, other), M)) == ["primary-2", "primary", "backup"]


def test_waiters_are_ordered_by_tier_then_priority_then_arrival_and_batch_ages() -> None:
    from app.jobs.router import waiter_score
    from app.schemas import InferRequest, RouteState

    def score(tier: str, priority: int = 5, waited: float = 0.0, level: int = 0) -> float:
        req = InferRequest(model="m", prompt="x", tier=tier, priority=priority)
        return waiter_score(req, RouteState(submitted_at=10_000.0 - waited), level)

    assert score("interactive") < score("normal") < score("batch")
    assert score("batch", priority=9) < score("batch", priority=0)
    assert score("batch", waited=5) < score("batch")
    assert score("batch", waited=100) > score("interactive")
    assert score("batch", waited=601) < score("interactive")  # aged: it cannot starve
    # Degradation levels reorder, they never hold: no aging past a protected tier under load.
    assert score("batch", waited=3600, level=1) > score("normal", level=1) > score("interactive")
    assert score("normal", waited=3600, level=2) > score("interactive", level=2)
    assert score("batch", waited=3600, level=2) > score("normal", level=2)
    assert score("normal", waited=3600, level=1) < score("interactive", level=1)  # still ages


def test_an_instance_takes_only_the_jobs_its_role_allows() -> None:
    s = snap(inst("chat", role="chat"), inst("emb", role="embedding"), inst("any"))
    assert sorted(names(rank(s, M, kind="embed"))) == ["any", "emb"]
    assert sorted(names(rank(s, M, kind="chat"))) == ["any", "chat"]
    assert sorted(names(rank(s, M, kind="generate"))) == ["any", "chat"]
