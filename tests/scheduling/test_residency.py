"""KV residency in the scheduling core: programs are admitted only while their working sets
fit a lane's KV budget, an admitted program is not displaced by newcomers, overflow
suspends the idle resident that will be idle longest, a human wait suspends at once, and
the admission queue follows tenant shares, least attained service and arrival."""

from __future__ import annotations

import math

import pytest

from treadle.runtime.sched.entities import Program
from treadle.runtime.sched.limits import LimitConfig
from treadle.runtime.sched.residency import ResidencyConfig
from treadle.runtime.sched.scheduler import Call, Scheduler, SchedulerConfig


def kv_scheduler(lanes: int = 1, budget: int = 1000, **residency: float) -> Scheduler:
    cfg = SchedulerConfig(
        limits=LimitConfig(initial=64, minimum=1, maximum=64),
        residency=ResidencyConfig(**residency),  # type: ignore[arg-type]
        las_quantum_s=1.0,
    )
    return Scheduler(lanes, cfg, kv_budgets=[budget] * lanes)


def admitted(s: Scheduler) -> list[str]:
    return sorted(pid for pid, p in s.programs.items() if p.admitted)


def test_programs_are_admitted_only_while_their_working_sets_fit() -> None:
    s = kv_scheduler(budget=1000, admit_fraction=0.9)
    for i in range(4):
        s.open_program(f"p{i}", "t", 0.0, kv_tokens=300)
    # 300 + 300 + 300 = 900 <= 0.9 x 1000; a fourth would not fit
    assert admitted(s) == ["p0", "p1", "p2"]
    assert s.lanes[0].kv_reserved == 900 and s.pending_programs == 1
    # a program that is not admitted holds nothing and its calls wait
    call = s.submit(Call("p3-a", "p3"), 0.0)
    assert call.state == "pending" and s.dispatch(0.0) == []
    s.close_program("p0", 1.0)
    assert admitted(s) == ["p1", "p2", "p3"]
    assert [c.call_id for c in s.dispatch(1.0)] == ["p3-a"]


def test_an_empty_lane_takes_a_program_larger_than_the_admission_threshold() -> None:
    s = kv_scheduler(budget=1000, admit_fraction=0.5)
    s.open_program("big", "t", 0.0, kv_tokens=950)
    assert admitted(s) == ["big"]


def test_an_admitted_program_is_not_displaced_by_a_flood_of_newcomers() -> None:
    s = kv_scheduler(budget=1000)
    s.open_program("old", "t", 0.0, kv_tokens=400)
    (c,) = [s.submit(Call("old-1", "old"), 0.0)]
    s.dispatch(0.0)
    s.complete(c, 1.0)
    s.idle("old", 1.0, expected_s=30.0)  # a long tool: it holds its KV meanwhile
    for i in range(50):
        s.open_program(f"new{i}", "t", 2.0, kv_tokens=200)
    assert s.programs["old"].admitted and s.programs["old"].resident_on == 0
    assert s.suspensions == {}
    assert s.lanes[0].kv_reserved <= 0.9 * 1000
    nxt = s.submit(Call("old-2", "old"), 31.0)
    assert nxt in s.dispatch(31.0)


def test_overflow_suspends_the_resident_idle_longest() -> None:
    s = kv_scheduler(budget=1000, admit_fraction=0.9, overflow_fraction=1.0, min_idle_s=0.5)
    suspended: list[str] = []
    s.on_suspend = lambda p, reason: suspended.append(f"{p.program_id}:{reason}")
    for pid, idle in (("short-tool", 1.0), ("long-tool", 40.0), ("returning", 0.1)):
        s.open_program(pid, "t", 0.0, kv_tokens=250)
        s.idle(pid, 0.0, expected_s=idle)
    s.open_program("growing", "t", 0.0, kv_tokens=100)
    assert admitted(s) == ["growing", "long-tool", "returning", "short-tool"]
    s.submit(Call("g-1", "growing"), 0.0)  # busy: never a victim
    s.set_working_set("growing", 400, 0.0)  # 1150 > 1000: someone must go
    assert suspended == ["long-tool:memory"]
    assert not s.programs["long-tool"].admitted and s.lanes[0].kv_reserved == 900
    # its next call brings it back to the admission queue; it waits until there is room
    s.submit(Call("lt-2", "long-tool"), 40.0)
    assert not s.programs["long-tool"].admitted and s.pending_programs == 1
    s.close_program("short-tool", 41.0)
    s.close_program("returning", 41.0)
    assert s.programs["long-tool"].admitted


def test_a_program_waiting_for_a_person_is_suspended_at_once() -> None:
    s = kv_scheduler(budget=1000)
    s.open_program("chat", "t", 0.0, kv_tokens=600)
    c = s.submit(Call("chat-1", "chat"), 0.0)
    s.dispatch(0.0)
    s.complete(c, 1.0)
    assert s.idle("chat", 1.0, expected_s=0.0, human=True)
    assert not s.programs["chat"].admitted and s.lanes[0].kv_reserved == 0
    assert s.pin_pressure("chat", 0.7) == 0.7  # not resident: a pin pays the full price
    s.open_program("other", "t", 2.0, kv_tokens=800)
    assert admitted(s) == ["other"]


def test_placement_prefers_the_lane_holding_the_cache_then_the_most_free() -> None:
    s = kv_scheduler(lanes=3, budget=1000)
    s.open_program("a", "t", 0.0, kv_tokens=500)
    s.open_program("b", "t", 0.0, kv_tokens=300)
    s.open_program("c", "t", 0.0, kv_tokens=100)
    homes = {pid: s.programs[pid].home for pid in "abc"}
    assert len(set(homes.values())) == 3  # worst fit spreads them
    s.idle("b", 0.0, 0.0, human=True)
    s.submit(Call("b-2", "b"), 5.0)
    assert s.programs["b"].home == homes["b"]  # back where its prefix is cached


def test_admission_follows_least_attained_service_then_arrival() -> None:
    s = kv_scheduler(budget=1000)
    s.open_program("hog", "t", 0.0, kv_tokens=900)
    c = s.submit(Call("hog-1", "hog"), 0.0)
    s.dispatch(0.0)
    s.complete(c, 10.0, service_s=10.0)
    assert s.programs["hog"].level > 0
    s.idle("hog", 10.0, 0.0, human=True)
    s.open_program("blocker", "t", 10.0, kv_tokens=900)
    s.submit(Call("hog-2", "hog"), 11.0)  # back in the queue with its attained service
    s.open_program("fresh", "t", 12.0, kv_tokens=900)  # arrives later, level 0
    s.close_program("blocker", 13.0)
    assert admitted(s) == ["fresh"]


def test_admission_alternates_tenants_by_weighted_service() -> None:
    s = kv_scheduler(budget=100, admit_fraction=1.0, overflow_fraction=1.0)
    s.set_weight("heavy", 3.0)
    s.set_weight("light", 1.0)
    order: list[str] = []
    now = 0.0
    for i in range(12):
        for t in ("heavy", "light"):
            s.open_program(f"{t}{i}", t, now, kv_tokens=100)
    while len(order) < 16:
        (p,) = [p for p in s.programs.values() if p.admitted]
        order.append(p.tenant.name)
        c = s.submit(Call(f"{p.program_id}-c", p.program_id, est_service_s=1.0), now)
        s.dispatch(now)
        now += 1.0
        s.complete(c, now)
        s.close_program(p.program_id, now)
    assert order.count("heavy") == pytest.approx(12, abs=1)


def test_within_a_tenant_a_program_that_waited_too_long_goes_first() -> None:
    s = kv_scheduler(budget=1000)
    s.open_program("hog", "t", 0.0, kv_tokens=900)
    c = s.submit(Call("hog-1", "hog"), 0.0)
    s.dispatch(0.0)
    s.complete(c, 10.0, service_s=10.0)  # a high level now
    s.idle("hog", 10.0, 0.0, human=True)
    s.open_program("blocker", "t", 10.0, kv_tokens=950)
    s.submit(Call("hog-2", "hog"), 11.0)  # waits from 11 s
    s.open_program("fresh", "t", 70.0, kv_tokens=900)  # level 0, but arrives later
    s.close_program("blocker", 72.0)  # "hog" has waited 61 s: past starvation_s
    assert admitted(s) == ["hog"] and s.starvation_promotions == 1


def test_across_tenants_fair_share_decides_even_for_long_waits() -> None:
    s = kv_scheduler(budget=1000)
    s.set_weight("light", 1.0)
    s.set_weight("heavy", 4.0)
    s.open_program("blocker", "heavy", 0.0, kv_tokens=950)
    c = s.submit(Call("b-1", "blocker", est_service_s=8.0), 0.0)
    s.dispatch(0.0)
    s.complete(c, 2.0, service_s=8.0)  # heavy's weighted service: 8 / 4 = 2
    s.open_program("light-old", "light", 1.0, kv_tokens=900)
    s.tenants["light"].vtime = 8.0  # light has had 8 (weight 1) before
    s.open_program("heavy-new", "heavy", 100.0, kv_tokens=900)
    s.close_program("blocker", 100.0)
    # light-old waited 99 s, but heavy is behind its share: heavy goes first
    assert admitted(s) == ["heavy-new"]


def test_residency_config_is_checked() -> None:
    with pytest.raises(ValueError):
        ResidencyConfig(admit_fraction=1.2, overflow_fraction=1.0)
    with pytest.raises(ValueError):
        Scheduler(2, kv_budgets=[100])


def test_lanes_without_a_budget_keep_the_backlog_rule() -> None:
    s = Scheduler(1, SchedulerConfig(limits=LimitConfig(initial=1, minimum=1, maximum=1)))
    for i in range(3):
        s.open_program(f"p{i}", "t", 0.0, kv_tokens=10**9)
    assert admitted(s) == ["p0", "p1", "p2"]
    assert math.isinf(s.lanes[0].kv_free())
    assert isinstance(s.programs["p0"], Program)


def test_an_admission_decision_costs_logarithmically_many_comparisons() -> None:
    from treadle.benchmarks.agents.bench import micro_admission

    small = micro_admission(1_000, 300, counting=True)["comparisons_per_admission"]
    large = micro_admission(16_000, 300, counting=True)["comparisons_per_admission"]
    # 16x the waiting programs: a linear scan would need ~16x the comparisons; a blocked
    # head adds up to `backfill` programs tried behind it, each O(log n)
    assert large < 2.0 * small, (small, large)
    backfill = SchedulerConfig().backfill
    assert large < (12 + 4 * backfill) * math.log2(16_000), large


def test_a_blocked_head_holds_one_lane_and_the_programs_behind_it_take_the_others() -> None:
    # two tenants of equal weight; "a" is ahead in fair share with a head too large for
    # any lane now: without backfilling, "b"'s small programs would wait behind it while
    # the other lane has room (and "b" would get nothing)
    s = kv_scheduler(lanes=2, budget=1000, admit_fraction=0.9)
    s.open_program("fill0", "a", 0.0, kv_tokens=700)
    s.open_program("fill1", "a", 0.0, kv_tokens=500)
    lanes = {pid: s.programs[pid].home for pid in ("fill0", "fill1")}
    s.tenants["b"] = s.tenant("b")
    s.tenants["b"].vtime = 5.0  # "a" (vtime 0) is behind its share: its head goes first
    s.open_program("a-big", "a", 1.0, kv_tokens=600)  # fits on neither lane yet
    assert not s.programs["a-big"].admitted
    for i in range(3):
        s.open_program(f"b{i}", "b", 2.0 + i, kv_tokens=150)
    # the head holds the lane with the most free KV (fill1's); "b" fills the other one
    held = lanes["fill1"]
    assert admitted(s) == ["b0", "fill0", "fill1"]
    assert s.programs["b0"].home == lanes["fill0"] != held
    assert s.backfilled == 1 and not s.programs["b1"].admitted
    assert all(p.home != held for p in s.programs.values() if p.program_id.startswith("b"))
    # nothing passes the head on its lane: when that lane frees, the head goes first
    s.close_program("fill1", 10.0)
    assert s.programs["a-big"].admitted and s.programs["a-big"].home == held
    # and the programs it held back keep their places (arrival order within "b")
    s.close_program("fill0", 11.0)
    assert s.programs["b1"].admitted and s.programs["b2"].admitted


def test_without_backfilling_a_blocked_head_blocks_every_lane() -> None:
    cfg = SchedulerConfig(limits=LimitConfig(initial=64, minimum=1, maximum=64), backfill=0)
    s = Scheduler(2, cfg, kv_budgets=[1000, 1000])
    s.open_program("fill0", "t", 0.0, kv_tokens=700)
    s.open_program("fill1", "t", 0.0, kv_tokens=500)
    s.open_program("big", "t", 1.0, kv_tokens=600)
    s.open_program("small", "t", 2.0, kv_tokens=100)
    assert admitted(s) == ["fill0", "fill1"]
    with pytest.raises(ValueError):
        SchedulerConfig(backfill=-1)
