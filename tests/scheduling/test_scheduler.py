"""The scheduling core: admission, least-attained-service, starvation freedom, tenant
shares, critical path, adaptive limits, and the O(log n) cost of a decision (counted)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from treadle.runtime.sched.fairness import jain_index
from treadle.runtime.sched.limits import AIMDLimit, LimitConfig, TTFTSignal
from treadle.runtime.sched.scheduler import (
    CANCELLED,
    DISPATCHED,
    Call,
    Scheduler,
    SchedulerConfig,
)


def fixed(limit: int, **kw: Any) -> SchedulerConfig:
    """A config whose lanes keep exactly `limit` calls in flight."""
    return SchedulerConfig(limits=LimitConfig(initial=limit, minimum=limit, maximum=limit), **kw)


def test_runs_are_admitted_in_arrival_order_and_only_while_backends_keep_up() -> None:
    s = Scheduler(1, fixed(1, backlog_factor=1.0))
    for i in range(4):
        s.open_program(f"p{i}", "t", now=float(i))
        s.submit(Call(f"p{i}-a", f"p{i}", est_service_s=1.0), now=float(i))
    # admitted until the admitted runs' queued calls exceed one lane limit of backlog
    admitted = [pid for pid, p in s.programs.items() if p.admitted]
    assert admitted == ["p0", "p1"]
    order: list[str] = []
    now = 10.0
    while len(order) < 4:
        (call,) = s.dispatch(now)
        order.append(call.program_id)
        s.complete(call, now)
        s.close_program(call.program_id, now)
        now += 1
    assert order == ["p0", "p1", "p2", "p3"]


def test_a_run_in_progress_goes_before_runs_that_arrive_later() -> None:
    s = Scheduler(1, fixed(1, backlog_factor=math.inf))
    s.submit(Call("old-1", "old", est_service_s=0.5), now=0.0, tenant="t")
    first = s.dispatch(0.0)
    assert [c.call_id for c in first] == ["old-1"]
    s.complete(first[0], 1.0)
    s.submit(Call("new-1", "new", est_service_s=0.5), now=1.5, tenant="t")
    s.submit(Call("old-2", "old", est_service_s=0.5), now=2.0, tenant="t")
    # same level (little service so far): program-level FCFS, the older run first
    assert [c.call_id for c in s.dispatch(2.0)] == ["old-2"]


def test_least_attained_service_lets_short_programs_pass_a_huge_one() -> None:
    s = Scheduler(1, fixed(1, las_quantum_s=1.0, backlog_factor=math.inf))
    s.submit(Call("huge-1", "huge", est_service_s=50.0), 0.0, tenant="t")
    (c,) = s.dispatch(0.0)
    s.complete(c, 50.0, service_s=50.0)
    assert s.programs["huge"].level > 0
    s.submit(Call("huge-2", "huge", est_service_s=50.0), 50.0, tenant="t")
    for i in range(3):
        s.submit(Call(f"short-{i}", f"short{i}", est_service_s=0.1), 51.0, tenant="t")
    order = []
    now = 52.0
    while s.queued_calls:
        (c,) = s.dispatch(now)
        order.append(c.call_id)
        s.complete(c, now, service_s=c.est_service_s)
        now += 0.1
    assert order == ["short-0", "short-1", "short-2", "huge-2"]
    # the backend priority follows the level (treadle convention: lower runs first)
    assert s.priority_of("huge") > s.priority_of("short0") == 0


def test_starvation_freedom_long_program_and_stream_of_short_ones_both_finish() -> None:
    """One lane, one call at a time, a stream of short programs that alone would fill it:
    the long program still progresses (anti-starvation) and every short one finishes."""
    cfg = fixed(1, las_quantum_s=0.5, starvation_s=5.0, backlog_factor=math.inf)
    s = Scheduler(1, cfg)
    long_calls = 30
    s.submit(Call("long-0", "long", est_service_s=1.0), 0.0, tenant="t")
    done_long = 0
    short_done = 0
    short_started = 0
    now = 0.0
    next_short = 0.0
    in_flight: list[Call] = []
    while now < 400.0 and (done_long < long_calls or short_done < short_started):
        # a short program (one call of 1 s) arrives every second: the lane is always busy
        if now >= next_short and now < 300.0:
            s.submit(Call(f"s{short_started}", f"short-{short_started}", 1.0), now, tenant="t")
            short_started += 1
            next_short += 1.0
        in_flight.extend(s.dispatch(now))
        now += 1.0
        for c in in_flight:
            s.complete(c, now, service_s=1.0)
            if c.program_id == "long":
                done_long += 1
                if done_long < long_calls:
                    s.submit(Call(f"long-{done_long}", "long", 1.0), now, tenant="t")
            else:
                short_done += 1
                s.close_program(c.program_id, now)
        in_flight.clear()
    assert done_long == long_calls  # the long program was not starved ...
    assert short_done == short_started > 250  # ... and neither were the short ones
    assert s.starvation_promotions > 0


@pytest.mark.parametrize("lanes", [1, 3])
def test_tenant_shares_follow_weights_under_saturation(lanes: int) -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    s = Scheduler(lanes, fixed(4, backlog_factor=math.inf))
    for t, w in weights.items():
        s.set_weight(t, w)
    rng = random.Random(7)
    n = 0
    # every tenant keeps a backlog deeper than the measured run can drain
    for t in weights:
        for p in range(12):
            for _ in range(800):
                n += 1
                s.submit(Call(f"c{n}", f"{t}-{p}", est_service_s=1.0), 0.0, tenant=t)
    service: dict[str, float] = dict.fromkeys(weights, 0.0)
    now = 0.0
    for _ in range(1200 // lanes):
        for c in s.dispatch(now):
            actual = rng.uniform(0.2, 3.0)  # the estimate is corrected at completion
            s.complete(c, now + actual, service_s=actual)
            service[s.programs[c.program_id].tenant.name] += actual
        now += 0.01
    assert all(s.tenants[t].lanes_with_work for t in weights)  # still saturated
    total = sum(service.values())
    for t, w in weights.items():
        share = service[t] / total
        want = w / sum(weights.values())
        assert abs(share - want) <= 0.05 * want, (t, share, want)


def test_critical_path_first_within_a_program() -> None:
    s = Scheduler(1, fixed(1, backlog_factor=math.inf))
    s.submit(Call("short-branch", "p", remaining_cost_s=2.0), 0.0, tenant="t")
    s.submit(Call("long-branch", "p", remaining_cost_s=9.0), 0.0, tenant="t")
    s.submit(Call("mid-branch", "p", remaining_cost_s=5.0), 0.0, tenant="t")
    order = []
    for now in range(3):
        (c,) = s.dispatch(float(now))
        order.append(c.call_id)
        s.complete(c, float(now))
    assert order == ["long-branch", "mid-branch", "short-branch"]


def test_lane_limit_adapts_to_congestion() -> None:
    lim = AIMDLimit(LimitConfig(initial=8, minimum=2, maximum=64, cooldown_s=1.0))
    # no congestion while the limit binds: it grows by about one per round trip
    for i in range(80):
        lim.observe(congested=False, in_flight=int(lim.value), now=i * 0.01)
    assert lim.value > 12
    grown = lim.value
    # not binding: no reason to grow
    lim.observe(congested=False, in_flight=1, now=1.0)
    assert lim.value == grown
    # congestion: multiplicative decrease, at most once per cooldown
    lim.observe(congested=True, in_flight=int(lim.value), now=2.0)
    lim.observe(congested=True, in_flight=int(lim.value), now=2.1)
    assert lim.value == pytest.approx(grown * 0.8)
    lim.observe(congested=True, in_flight=int(lim.value), now=3.5)
    assert lim.value == pytest.approx(grown * 0.64)


def test_scheduler_limit_follows_completions_and_holds_calls_back() -> None:
    cfg = SchedulerConfig(
        backlog_factor=math.inf, limits=LimitConfig(initial=2, minimum=1, maximum=8)
    )
    s = Scheduler(1, cfg)
    for i in range(50):
        s.submit(Call(f"c{i}", f"p{i}"), 0.0, tenant="t")
    assert len(s.dispatch(0.0)) == 2  # the rest wait in the scheduler, not the backend
    now = 0.0
    for _ in range(20):
        now += 1.0
        for c in [c for c in s.calls.values() if c.state == DISPATCHED]:
            s.complete(c, now, congested=False)
        s.dispatch(now)
    assert s.lanes[0].limit.value > 2


def test_ttft_signal_learns_a_baseline_per_prompt_size() -> None:
    sig = TTFTSignal(tolerance=2.0, slack_s=0.0)
    assert sig.congested(None, 100) is None
    assert sig.congested(0.1, 1000) is False  # first sample: the baseline
    assert sig.congested(0.15, 1000) is False
    assert sig.congested(0.5, 1000) is True
    assert sig.congested(0.5, 64_000) is False  # another size, another baseline


def test_cancelling_a_program_drops_its_queued_calls() -> None:
    s = Scheduler(1, fixed(1, backlog_factor=math.inf))
    s.submit(Call("a1", "a"), 0.0, tenant="t")
    s.submit(Call("a2", "a"), 0.0, tenant="t")
    s.submit(Call("b1", "b"), 0.0, tenant="t")
    (first,) = s.dispatch(0.0)
    assert first.call_id == "a1"
    dropped = s.cancel_program("a", 1.0)
    assert [c.call_id for c in dropped] == ["a2"] and dropped[0].state == CANCELLED
    s.complete(first, 1.0)
    assert [c.call_id for c in s.dispatch(1.0)] == ["b1"]
    assert s.queued_calls == 0


def test_cancel_call_withdraws_only_queued_calls() -> None:
    s = Scheduler(1, fixed(1, backlog_factor=math.inf))
    a = s.submit(Call("a", "p"), 0.0)
    b = s.submit(Call("b", "q"), 0.0)
    s.dispatch(0.0)
    assert a.state == DISPATCHED
    assert s.cancel_call(a) is False
    assert s.cancel_call(b) is True and s.queued_calls == 0


def test_idle_lane_steals_a_call_that_waits_on_a_full_one() -> None:
    cfg = fixed(1, backlog_factor=math.inf, steal_after_s=1.0)
    s = Scheduler(2, cfg, place=lambda p, lanes: 0)  # everything homed on lane 0
    for i in range(3):
        s.submit(Call(f"c{i}", f"p{i}"), 0.0, tenant="t")
    assert [c.assigned for c in s.dispatch(0.0)] == [0]
    # not yet waited long enough: lane 1 stays idle
    assert s.dispatch(0.5) == []
    stolen = s.dispatch(2.0)
    assert [c.assigned for c in stolen] == [1] and stolen[0].stolen
    assert s.programs[stolen[0].program_id].home == 1
    assert s.steals == 1


def test_jain_index() -> None:
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)


# -- the cost of a decision, counted ---------------------------------------------------------


def _comparisons_per_decision(queued: int, seed: int = 3) -> float:
    rng = random.Random(seed)
    s = Scheduler(
        4,
        SchedulerConfig(
            limits=LimitConfig(initial=8, minimum=8, maximum=8), backlog_factor=math.inf
        ),
        count_comparisons=True,
    )
    tenants = [f"t{i}" for i in range(8)]
    n = 0

    def submit(now: float) -> None:
        nonlocal n
        n += 1
        pid = rng.randrange(max(1, queued // 8))
        s.submit(
            Call(
                f"c{n}", f"p{pid}", est_service_s=rng.uniform(0.1, 2), remaining_cost_s=rng.random()
            ),
            now,
            tenant=tenants[pid % len(tenants)],
        )

    for _ in range(queued):
        submit(0.0)
    in_flight = s.dispatch(0.0)
    start = s.comparisons
    decisions = 400
    now = 0.0
    for _ in range(decisions):
        now += 0.001
        done = in_flight.pop(rng.randrange(len(in_flight)))
        s.complete(done, now, service_s=done.est_service_s * rng.uniform(0.5, 1.5))
        submit(now)
        in_flight.extend(s.dispatch(now))
    assert s.queued_calls + len(in_flight) == queued
    return (s.comparisons - start) / decisions


def test_a_decision_costs_logarithmically_many_comparisons() -> None:
    small = _comparisons_per_decision(1_000)
    large = _comparisons_per_decision(16_000)
    # 16x the queue: a linear structure would need ~16x the comparisons, a heap ~log ratio
    assert large < 2.0 * small, (small, large)
    # and in absolute terms a small multiple of log2(n)
    assert large < 12 * math.log2(16_000), large


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_every_call_accounted_for(seed: int) -> None:
    """Random submits, dispatches, completions, cancellations and steals across lanes and
    tenants: every call is dispatched at most once, limits hold, counters stay exact, and
    everything left is dispatched once the arrivals stop."""
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        backlog_factor=rng.choice([0.5, 2.0, math.inf]),
        starvation_s=rng.choice([0.5, 5.0]),
        steal_after_s=0.2,
        las_quantum_s=0.5,
        limits=LimitConfig(initial=3, minimum=1, maximum=6, cooldown_s=0.1),
    )
    s = Scheduler(3, cfg)
    for t in ("a", "b", "c"):
        s.set_weight(t, rng.choice([1.0, 2.0, 3.0]))
    dispatched: set[str] = set()
    in_flight: list[Call] = []
    cancelled: set[str] = set()
    n = 0
    now = 0.0

    def check() -> None:
        queued = [c for c in s.calls.values() if c.state == "queued"]
        assert s.queued_calls == len(queued) == sum(ln.queued for ln in s.lanes)
        for ln in s.lanes:
            assert ln.in_flight <= max(ln.limit.value, 1) + 1e-9 or ln.in_flight <= 6
            assert ln.in_flight == sum(1 for c in in_flight if c.assigned == ln.index)

    for step in range(1500):
        now += rng.uniform(0.0, 0.05)
        op = rng.random()
        if op < 0.45 and step < 1200:
            n += 1
            pid = f"p{rng.randrange(40)}"
            tenant = "abc"[int(pid[1:]) % 3]
            lane = rng.choice([None, None, rng.randrange(3)])
            s.submit(
                Call(
                    f"c{n}",
                    pid,
                    est_service_s=rng.uniform(0.05, 1.0),
                    lane=lane,
                    remaining_cost_s=rng.random(),
                ),
                now,
                tenant=tenant,
            )
        elif op < 0.75:
            for c in s.dispatch(now):
                assert c.call_id not in dispatched and c.state == "dispatched"
                dispatched.add(c.call_id)
                in_flight.append(c)
        elif op < 0.92 and in_flight:
            c = in_flight.pop(rng.randrange(len(in_flight)))
            s.complete(c, now, service_s=rng.uniform(0.01, 2.0), congested=rng.random() < 0.2)
        elif op < 0.96:
            queued = [c for c in s.calls.values() if c.state in ("queued", "pending")]
            if queued:
                victim = rng.choice(queued)
                assert s.cancel_call(victim)
                cancelled.add(victim.call_id)
        elif s.programs:
            pid = rng.choice(sorted(s.programs))
            if not any(c.program_id == pid for c in in_flight):
                cancelled.update(c.call_id for c in s.cancel_program(pid, now))
        check()
    # drain: no more arrivals, everything queued still goes out
    for _ in range(5000):
        now += 0.05
        for c in s.dispatch(now):
            assert c.call_id not in dispatched
            dispatched.add(c.call_id)
            in_flight.append(c)
        while in_flight:
            s.complete(in_flight.pop(), now)
        if not s.queued_calls and not s.pending_programs:
            break
    check()
    assert s.queued_calls == 0
    assert dispatched.isdisjoint(cancelled)
    assert len(dispatched) + len(cancelled) == n
