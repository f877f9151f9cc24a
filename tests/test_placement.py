"""The placement plan (routing.placement), as pure functions: no broker, no Redis."""

from __future__ import annotations

from dataclasses import replace

import pytest

from routing import FleetSnapshot, InstanceStats, Placement, plan, rank

A, B, C = "a:latest", "b:latest", "c:latest"
BOTH = frozenset({A, B})


def box(name: str, loaded: frozenset[str] = frozenset(), **kw: object) -> InstanceStats:
    base: dict[str, object] = {
        "capacity": 2,
        "models": BOTH,
        "loaded": loaded,
        "max_loaded": 1,
        "model_ewma_ms": {A: 250.0, B: 250.0},
        "load_ms": {A: 1000.0, B: 1000.0},
    }
    return InstanceStats(name=name, **{**base, **kw})  # type: ignore[arg-type]


def snap(*boxes: InstanceStats, backlog: dict[str, int], urgent: dict[str, int] | None = None):
    return FleetSnapshot(tuple(boxes), 100.0, backlog=backlog, urgent=urgent or {})


def holders(p: Placement, model: str) -> set[str]:
    return {n for n, held in p.hold.items() if model in held}


def test_cold_fleet_splits_the_boxes_between_the_models_with_work() -> None:
    p = plan(snap(box("x"), box("y"), box("z"), backlog={A: 60, B: 60}))
    assert len(holders(p, A)) + len(holders(p, B)) == 3
    assert holders(p, A) and holders(p, B)
    assert all(len(held) == 1 for held in p.hold.values())


def test_a_box_keeps_its_model_while_that_model_has_work() -> None:
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={A: 10, B: 60})
    p = plan(s)
    assert p.hold == {"x": {A}, "y": {B}}
    assert not p.allows("x", B) and not p.allows("y", A)


def test_a_box_switches_only_when_the_switch_pays_for_itself() -> None:
    # A has no work left: x goes to B, whose single box would need 15 s for 60 jobs.
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={B: 60})
    assert plan(s).hold["x"] == {B}
    # Three jobs of B: y gets through them in 0.5 s, less than a load; x stays on A.
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={B: 3})
    assert plan(s).hold["x"] == {A}


def test_no_switch_for_the_last_jobs_of_a_backlog() -> None:
    # 20 jobs of A on x and y: 1.25 s left, more than a load; with z too (after its 1 s load)
    # 1.17 s, not a job's time sooner: z stays. With 40 jobs, 2.5 s against 2 s: z switches.
    boxes = (box("x", frozenset({A})), box("y", frozenset({A})), box("z", frozenset({B})))
    assert plan(snap(*boxes, backlog={A: 20})).hold["z"] == {B}
    assert plan(snap(*boxes, backlog={A: 40})).hold["z"] == {A}


def test_a_box_moves_to_the_backlog_that_would_end_last_once_both_drain() -> None:
    boxes = (box("x", frozenset({A})), box("y", frozenset({A})), box("z", frozenset({B})))
    held = {"x": frozenset({A}), "y": frozenset({A}), "z": frozenset({B})}
    # A ends in 1.25 s on two boxes, B in 5.6 s on one: with one of A's boxes, 3.3 s (a load
    # included), and A then ends in 2.5 s, still before B.
    draining = Placement(hold=held, seen={A: 32, B: 45})
    p = plan(snap(*boxes, backlog={A: 20, B: 45}), draining)
    assert len(holders(p, A)) == 1 and len(holders(p, B)) == 2
    # With 30 jobs of A, A on one box would end last (3.75 s): not yet, or the next plan
    # moves the box back.
    assert plan(snap(*boxes, backlog={A: 30, B: 45}), draining).hold == held
    # B's backlog still growing (a batch being submitted): no move.
    growing = Placement(hold=held, seen={A: 32, B: 40})
    assert plan(snap(*boxes, backlog={A: 20, B: 45}), growing).hold == held
    # At the start (60 and 60) moving a box ends neither sooner.
    start = Placement(hold=held, seen={A: 60, B: 60})
    assert plan(snap(*boxes, backlog={A: 60, B: 60}), start).hold == held


def test_boxes_beyond_what_the_backlog_keeps_busy_are_released() -> None:
    s = snap(
        box("x", frozenset({A})),
        box("y", frozenset({A})),
        box("z", frozenset({B})),
        backlog={A: 2, B: 40},
    )
    p = plan(s)
    assert len(holders(p, A)) == 1 and len(holders(p, B)) == 2


def test_a_model_without_a_box_takes_one_from_a_model_holding_two() -> None:
    s = snap(
        box("x", frozenset({A})),
        box("y", frozenset({A})),
        box("z", frozenset({A})),
        backlog={A: 100, B: 5},
    )
    p = plan(s)
    assert len(holders(p, B)) == 1 and len(holders(p, A)) == 2


def test_urgent_jobs_take_a_box_from_a_model_holding_only_one() -> None:
    s = snap(box("x", frozenset({A})), backlog={A: 100, B: 1})
    assert plan(s).hold["x"] == {A}  # batch: it waits for A's backlog (and ages)
    assert plan(replace(s, urgent={B: 1})).hold["x"] == {B}


def test_room_is_given_by_the_plan_not_to_whichever_job_finds_it() -> None:
    s = snap(box("x", frozenset({A}), max_loaded=3), backlog={A: 100})
    p = plan(s)
    assert p.allows("x", A) and not p.allows("x", B)
    assert plan(replace(s, backlog={A: 100, B: 1})).hold["x"] == {A, B}


def test_every_model_gets_a_share_of_two_model_boxes() -> None:
    five = [f"m{i}:latest" for i in range(5)]
    boxes = [
        box(f"b{i}", max_loaded=2, models=frozenset(five), model_ewma_ms={}, load_ms={})
        for i in range(4)
    ]
    demand = dict(zip(five, [200, 80, 60, 40, 20], strict=True))
    p = plan(snap(*boxes, backlog=demand))
    for m in five:
        assert holders(p, m), m
    assert all(len(held) <= 2 for held in p.hold.values())
    assert len(holders(p, five[0])) >= 2


def test_a_switch_is_remembered_until_the_heartbeat_reports_it() -> None:
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={B: 60})
    first = plan(s)
    assert first.hold["x"] == {B} and first.arriving["x"] == {B: 100.0}
    # A new job of A arrives before the heartbeat: x stays switched to B.
    again = plan(replace(s, backlog={A: 1, B: 58}), first)
    assert again.hold["x"] == {B}
    # Settled: no longer a switch, but still what x holds; A takes a box back from B, the
    # one where A is still loaded.
    later = plan(replace(s, backlog={A: 1, B: 58}, now=200.0), first)
    assert later.hold == {"x": {A}, "y": {B}} and not later.arriving


def test_rank_honours_the_plan() -> None:
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={A: 10, B: 60})
    s = replace(s, placement=plan(s))
    assert [c.instance for c in rank(s, A, strategy="least_connections")] == ["x"]
    assert [c.instance for c in rank(s, B, strategy="smart")] == ["y"]
    # Tried on every box the plan allows: it may go back there rather than wait forever.
    assert [c.instance for c in rank(s, A, exclude=["x"])] == ["x"]


def test_a_down_box_is_not_planned_and_left_to_the_ranking() -> None:
    s = snap(box("x", frozenset({A}), healthy=False), box("y"), backlog={A: 10})
    p = plan(s)
    assert "x" not in p.hold and p.hold["y"] == {A}


def test_a_backlog_that_reads_empty_for_a_moment_keeps_its_box() -> None:
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={A: 10, B: 60})
    first = plan(s)
    blip = plan(replace(s, backlog={B: 60}, now=100.5), first)
    assert blip.hold["x"] == {A}
    assert plan(replace(s, backlog={B: 60}, now=101.5), blip).hold["x"] == {B}


def test_what_a_box_holds_is_the_plans_choice_not_its_last_report() -> None:
    three = frozenset({A, B, C})
    boxes = (
        box("x", frozenset({A}), max_loaded=2, models=three),
        box("y", frozenset({B}), max_loaded=2, models=three),
    )
    first = plan(snap(*boxes, backlog={A: 20, B: 20}))
    # A job of C went to x on an older plan and Ollama evicted A for it: the report lags and
    # says {C}; the plan keeps A there (and counts C beside it, the room it fits in).
    evicted = (replace(boxes[0], loaded=frozenset({C})), boxes[1])
    again = plan(replace(snap(*evicted, backlog={A: 20, B: 20}), now=100.5), first)
    assert A in again.hold["x"] and again.hold["y"] >= {B}
    assert not again.allows("y", C)


def test_a_model_lingers_after_its_last_job_longer_after_an_urgent_one() -> None:
    s = snap(box("x", frozenset({A})), box("y", frozenset({B})), backlog={B: 60})
    p = plan(s)
    assert p.hold["x"] == {B}  # A has no work: x goes to B
    kept = plan(
        s, replace(p, hold={"x": frozenset({A}), "y": frozenset({B})}).with_job(A, False, 100.0)
    )
    assert kept.hold["x"] == {A}  # a job of A just started (no reading saw it)
    urgent = Placement(hold={"x": frozenset({A}), "y": frozenset({B})}).with_job(A, True, 100.0)
    assert plan(replace(s, now=102.5), urgent).hold["x"] == {A}
    assert plan(replace(s, now=103.5), urgent).hold["x"] == {B}


def test_a_lingering_model_keeps_its_box_but_gets_no_new_one() -> None:
    s = snap(box("x", frozenset({B})), box("y", frozenset({B})), backlog={B: 60})
    lost = Placement(hold={"x": frozenset({B}), "y": frozenset({B})}).with_job(A, True, 100.0)
    assert holders(plan(s, lost), A) == set()


def test_the_job_being_routed_counts_when_the_reading_missed_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first interactive job for a model loaded nowhere: the backlog reading (made before
    it was queued) has no job of it, so the plan gives it no box; the plan is made again
    counting the job, and it is ranked on the box the plan takes for it at once."""
    from app.jobs import placement as on_job_path

    monkeypatch.setattr(on_job_path, "_demand", lambda models: (1.0, {A: 100}, {}))
    monkeypatch.setattr(on_job_path, "_planner", on_job_path._Planner())
    monkeypatch.setattr(on_job_path, "_show", lambda *shown: True)
    monkeypatch.setattr(on_job_path._Planner, "_previous", lambda self: (None, self._plan))
    served = frozenset({A, B, C})
    s = snap(
        box("x", frozenset({A}), models=served), box("y", frozenset({A}), models=served), backlog={}
    )
    batch = on_job_path.with_plan(s, B, "least_connections", lambda m: 0)
    assert batch.placement is not None and holders(batch.placement, B) == {"y"}
    urgent = on_job_path.with_plan(s, C, "least_connections", lambda m: 0, urgent_job=True)
    assert urgent.placement is not None and holders(urgent.placement, C)
    assert [c.instance for c in rank(urgent, C)] == sorted(holders(urgent.placement, C))


def test_smart_assumes_the_fleets_load_time_on_a_box_that_never_loaded_the_model() -> None:
    # y never loaded B (nothing learned there): with 5 s assumed, 18 jobs of B would rather
    # wait for x; with the 1 s the fleet learned, y (switched to B by the plan) takes them.
    s = snap(
        box("x", frozenset({B})),
        box("y", frozenset({A}), load_ms={A: 1000.0}, model_ewma_ms={A: 250.0}),
        backlog={B: 18},
    )
    s = replace(s, placement=plan(s))
    assert s.placement is not None and s.placement.hold["y"] == {B}
    assert {c.instance for c in rank(s, B, strategy="smart")} == {"x", "y"}
    unknown = replace(s, instances=tuple(replace(i, load_ms={}) for i in s.instances))
    assert [c.instance for c in rank(unknown, B, strategy="smart")] == ["x"]


def test_a_switch_just_decided_stays_while_the_backlog_reads_low() -> None:
    three = (box("x"), box("y"), box("z"))
    first = plan(snap(*three, backlog={A: 30, B: 30}))
    a_boxes = holders(first, A)
    assert len(a_boxes) == 2
    # Half a second later the reading (the batch still being submitted) says 2 jobs of A:
    # both boxes stay on A, not yet loaded there; without the switch pending, one would go.
    low = replace(snap(*three, backlog={A: 2, B: 30}), now=100.5)
    assert holders(plan(low, first), A) == a_boxes


def test_a_model_gets_a_box_that_is_not_loading_another() -> None:
    three = frozenset({A, B, C})
    boxes = [box(n, frozenset({A}), models=three, max_loaded=2) for n in ("x", "y")]
    busy = Placement(hold={"x": frozenset({B}), "y": frozenset({A})}, arriving={"x": {B: 99.5}})
    boxes[0] = replace(boxes[0], loaded=frozenset())
    p = plan(snap(*boxes, backlog={A: 20, B: 20, C: 1}, urgent={C: 1}), busy)
    # Both have room for C; x is loading B, and C's job would wait for that load.
    assert holders(p, C) == {"y"} and B in p.hold["x"]


def test_an_urgent_model_takes_a_box_that_is_not_loading_from_any_donor() -> None:
    three = frozenset({A, B, C})
    boxes = [box(n, models=three) for n in ("x", "y")] + [box("z", frozenset({B}), models=three)]
    # A holds x and y, both still loading it; B holds z: C takes z.
    busy = Placement(
        hold={"x": frozenset({A}), "y": frozenset({A}), "z": frozenset({B})},
        arriving={"x": {A: 99.5}, "y": {A: 99.5}},
    )
    p = plan(snap(*boxes, backlog={A: 40, B: 4, C: 1}, urgent={C: 1}), busy)
    assert holders(p, C) == {"z"}


def test_an_urgent_model_takes_the_box_whose_loads_should_be_over() -> None:
    """Reports lag: every box still lists a switch as pending. x and y were switched to A
    0.2 s ago (loading it now), z to B 2 s ago (loaded by now, not reported yet): C, urgent,
    takes z, though A holds two boxes and B one."""
    three = frozenset({A, B, C})
    boxes = [box(n, models=three) for n in ("x", "y", "z")]
    pending = Placement(
        hold={"x": frozenset({A}), "y": frozenset({A}), "z": frozenset({B})},
        arriving={"x": {A: 99.8}, "y": {A: 99.8}, "z": {B: 98.0}},
    )
    p = plan(snap(*boxes, backlog={A: 40, B: 20, C: 1}, urgent={C: 1}), pending)
    assert holders(p, C) == {"z"}
    # B's switch there is undone with it: z's worker must not preload B (app.jobs.model_swap).
    assert p.arriving["z"] == {C: 100.0}


def test_a_load_a_job_has_begun_counts_from_its_start() -> None:
    """The switch to B on y was decided 1.5 s ago, so by the switches alone its load should
    be over; but its first job began loading B only 0.2 s ago (its worker says so): C goes
    to x, whose switch to A, decided 1.2 s ago, no job has begun loading yet."""
    three = frozenset({A, B, C})
    x, y = box("x", models=three), box("y", models=three, loading={B: 99.8})
    pending = Placement(
        hold={"x": frozenset({A}), "y": frozenset({B})},
        arriving={"x": {A: 98.8}, "y": {B: 98.5}},
    )
    p = plan(snap(x, y, backlog={A: 40, B: 40, C: 1}, urgent={C: 1}), pending)
    assert holders(p, C) == {"x"}


def test_loads_begun_on_a_box_run_one_after_the_other() -> None:
    """y is loading B since 0.8 s, and a job of A sent 0.7 s ago waits behind that load for
    its own: y is busy loading until 101.2, not 100.3. x, whose load of A began 0.55 s ago,
    is done at 100.45: C goes there."""
    three = frozenset({A, B, C})
    x = box("x", models=three, loading={A: 99.45})
    y = box("y", models=three, loading={B: 99.2, A: 99.3})
    held = Placement(hold={"x": frozenset({A}), "y": frozenset({A, B})})
    p = plan(snap(x, y, backlog={A: 40, B: 40, C: 1}, urgent={C: 1}), held)
    assert holders(p, C) == {"x"}


def test_an_urgent_model_does_not_take_the_place_of_a_model_being_loaded() -> None:
    """y holds A (loaded) and B (a job is loading it): C, urgent, takes A's place; B's load
    and its jobs queued inside Ollama run anyway, and C would wait for them too."""
    three = frozenset({A, B, C})
    y = box("y", frozenset({A}), models=three, max_loaded=2, loading={B: 99.5})
    p = plan(snap(y, backlog={A: 10, B: 10, C: 1}, urgent={C: 1}), Placement(hold={"y": BOTH}))
    assert p.hold["y"] == {B, C}


def test_a_router_plans_afresh_once_no_plan_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet idle (no plan published for a while, or cleared): the router's own last plan
    is not built on, since the boxes no longer hold what it says."""
    from app.jobs import placement as on_job_path

    class Shown:
        def latest(self) -> None:
            return None

    monkeypatch.setattr(on_job_path, "fleet_state", lambda: type("F", (), {"placement": Shown()}))
    monkeypatch.setattr(on_job_path, "_show", lambda *shown: True)
    planner = on_job_path._Planner()
    s = snap(box("x"), box("y"), box("z"), backlog={A: 60})
    assert holders(planner(s, 1.0), A) == {"x", "y", "z"}
    assert planner._previous() == (None, None)  # not its own plan, A on every box


def test_a_router_plans_again_on_the_plan_another_published_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Router 2 plans on router 1's plan; router 1 then publishes a new one first (C moved
    to y for its urgent job): router 2's plan is not published, and it plans again on router
    1's, which it keeps, though its own reading of the backlog has no job of C."""
    from app.jobs import placement as on_job_path
    from app.state.placement import Published

    three = frozenset({A, B, C})
    before = {"x": [A], "y": [B]}
    urgent_c = {"x": [A], "y": [C]}

    class Shown:
        def __init__(self) -> None:
            self.current = Published("r1", 90.0, before, {}, {}, {})
            self.tries: list[tuple[str, float] | None] = []

        def latest(self) -> Published:
            return self.current

        def publish(self, hold: dict[str, list[str]], **kw: object) -> bool:
            self.tries.append(kw["based_on"])  # type: ignore[arg-type]
            if len(self.tries) == 1:  # router 1 got there first
                arriving = {"y": {C: 99.9}}
                self.current = Published("r1", 99.9, urgent_c, arriving, {C: 103.0}, {})
                return False
            self.current = Published("r2", 100.0, hold, {}, {}, {})
            return True

        def nudge(self, instance: str, models: list[str]) -> None:
            pass

    shown = Shown()
    fleet = type(
        "F", (), {"placement": shown, "slots": type("S", (), {"offer": lambda self, moved: 0})()}
    )
    monkeypatch.setattr(on_job_path, "fleet_state", lambda: fleet)
    boxes = [box(n, models=three) for n in ("x", "y")]
    p = on_job_path._Planner()(snap(*boxes, backlog={A: 10, B: 10}), 1.0)
    assert shown.tries == [("r1", 90.0), ("r1", 99.9)]
    assert p.hold["y"] == {C} and shown.current.by == "r2"


def test_a_router_plans_by_itself_only_while_its_jobs_look_for_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between two routed jobs the plan still follows the backlog (``keep_planning``), but a
    router with no job looking for a slot leaves the last plan alone."""
    import threading
    import time

    from app.jobs import placement as on_job_path

    s = snap(box("x"), box("y"), backlog={})
    fleet = type("F", (), {"instances": type("I", (), {"snapshot": staticmethod(lambda: s)})})
    made: list[float] = []
    monkeypatch.setattr(on_job_path, "fleet_state", lambda: fleet)
    monkeypatch.setattr(on_job_path, "_demand", lambda models: (1.0, {A: 10}, {}))
    monkeypatch.setattr(on_job_path, "_planner", lambda snapshot, at: made.append(at))
    monkeypatch.setattr(on_job_path, "PLAN_EVERY_S", 0.01)
    stop = threading.Event()
    planning = threading.Thread(target=on_job_path.keep_planning, args=(stop,), daemon=True)
    planning.start()
    try:
        time.sleep(0.1)
        assert made == []
        with on_job_path.routing_job():
            time.sleep(0.1)
        assert made
        count = len(made)
        time.sleep(0.1)
        assert len(made) <= count + 1  # a look already under way when the job left
    finally:
        stop.set()
        planning.join(1)


# Memory: what fits on a box, not only how many ------------------------------------------------

GIB = 1024**3
BIG, S1, S2 = "big:latest", "s1:latest", "s2:latest"
SIZES = {BIG: 7.0 * GIB, S1: 4.0 * GIB, S2: 4.0 * GIB}


def mem_box(name: str, memory: float | None = 10 * GIB, **kw: object) -> InstanceStats:
    """A box of 10 GiB: the big model alone, or the two small ones (max_loaded alone: all
    three); it reports every model's size (/api/tags)."""
    three = frozenset(SIZES)
    base: dict[str, object] = {
        "models": three,
        "max_loaded": 3,
        "memory": memory,
        "sizes": dict(SIZES),
        "model_ewma_ms": dict.fromkeys(three, 250.0),
        "load_ms": dict.fromkeys(three, 1000.0),
    }
    return box(name, **{**base, **kw})


@pytest.mark.parametrize("backlog", [{BIG: 12, S1: 12, S2: 12}, {BIG: 12, S1: 30, S2: 30}])
def test_a_big_model_gets_a_box_of_its_own_and_the_small_ones_share_the_other(
    backlog: dict[str, int],
) -> None:
    # Small backlogs placed first (30 jobs each) would take one box each, and leave the big
    # model none: the biggest model is placed first.
    p = plan(snap(mem_box("x"), mem_box("y"), backlog=backlog))
    assert sorted(map(sorted, p.hold.values())) == [[BIG], [S1, S2]], p.hold
    # And the next plan keeps it so.
    again = plan(snap(mem_box("x"), mem_box("y"), backlog=backlog), p)
    assert again.hold == p.hold


def test_a_model_bigger_than_a_box_s_memory_is_never_placed_there() -> None:
    small = mem_box("x", memory=6 * GIB)  # idle, empty: the count alone would choose it
    large = mem_box("y", loaded=frozenset({S1}), memory=20 * GIB)
    for urgent in ({}, {BIG: 1}):
        p = plan(snap(small, large, backlog={BIG: 10, S1: 50}, urgent=urgent))
        assert BIG not in p.hold["x"] and p.hold["y"] == {BIG, S1}, p.hold
    # With no box it fits on, it gets none, even urgent; x still runs what fits there.
    p = plan(snap(small, backlog={BIG: 10, S1: 5}, urgent={BIG: 1}))
    assert p.hold == {"x": {S1}}
    # Not even reported loaded there (a size learned since) keeps it in the plan.
    p = plan(snap(mem_box("x", loaded=frozenset({BIG}), memory=6 * GIB), backlog={BIG: 10}))
    assert p.hold == {"x": frozenset()}


def test_without_a_memory_budget_the_sizes_change_nothing() -> None:
    boxes = [mem_box(n, memory=None) for n in ("x", "y")]
    unsized = [replace(b, sizes={}) for b in boxes]
    backlog = {BIG: 12, S1: 30, S2: 30}
    assert plan(snap(*boxes, backlog=backlog)) == plan(snap(*unsized, backlog=backlog))
    # And the count alone puts all three beside each other (what Ollama would thrash on).
    assert any(
        len(held) >= 2 and BIG in held for held in plan(snap(*boxes, backlog=backlog)).hold.values()
    )
