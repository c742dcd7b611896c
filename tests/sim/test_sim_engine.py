"""The engine's physics and policies, in virtual time (the simulator's checks in
docs/benchmarks.md)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, EngineConfig, SimRequest, StepInfo
from treadle.backends.sim.profile import Profile
from treadle.backends.sim.trace import load_mooncake, replay
from treadle.benchmarks.common import data_dir

PROFILE = Profile.default()
MOONCAKE = data_dir() / "mooncake" / "conversation_trace.jsonl"


def make(**config: Any) -> tuple[VirtualClock, Engine]:
    clock = VirtualClock()
    config.setdefault("keep_finished", True)
    return clock, Engine(PROFILE, clock, EngineConfig(**config))


def toks(seed: int, n: int) -> list[int]:
    return [seed * 1_000_000 + i for i in range(n)]


def settled(engine: Engine) -> None:
    """Nothing runs, nothing waits, every block is accounted for."""
    engine.cache.check()
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert engine.cache.private == 0


# -- time to first token and decode throughput ---------------------------------------------


@pytest.mark.parametrize("n", [1, 100, 5000, 20000])
def test_lone_request_ttft_is_the_profile_prefill_time(n: int) -> None:
    clock, engine = make()
    r = engine.submit(SimRequest(Prompt.from_tokens(toks(1, n)), 10))
    clock.run()
    assert r.ttft == pytest.approx(PROFILE.prefill_time(n), rel=1e-9)
    assert r.output_tokens == 10
    settled(engine)


def _decode_rate(batch: int) -> float:
    """Output tokens/s of `batch` requests decoding together (8-token prompts, one step)."""
    clock, engine = make(max_num_seqs=1024)
    reqs = [engine.submit(SimRequest(Prompt.anonymous(8), 129)) for _ in range(batch)]
    clock.run()
    assert len({r.first_token_time for r in reqs}) == 1  # one prefill step for all
    span = max(r.finish_time or 0.0 for r in reqs) - (reqs[0].first_token_time or 0.0)
    return batch * 128 / span


def test_decode_throughput_rises_with_batch_then_flattens_at_the_roofline() -> None:
    rates = {b: _decode_rate(b) for b in (1, 32, 512, 1024)}
    # Memory bound: a step streams the weights once, however many requests share it.
    assert rates[32] > 25 * rates[1]
    # Compute bound: doubling the batch doubles the step time; the rate is the GEMMs' FLOP
    # roof, less the attention kernel's KV reads, which run after the GEMMs (per kernel).
    assert rates[1024] / rates[512] < 1.05
    roof = PROFILE.effective_flops / (2 * PROFILE.model.params)
    assert 0.8 * roof < rates[1024] < roof
    # The knee sits where the roofline puts it: weights time == linear-layer time.
    knee = (PROFILE.weight_bytes / PROFILE.effective_bandwidth) * roof
    assert 100 < knee < 300
    assert PROFILE.decode_step_time(int(knee / 2), 8) < 1.2 * PROFILE.decode_step_time(1, 8)
    assert PROFILE.decode_step_time(int(knee * 2), 8) > 1.7 * PROFILE.decode_step_time(1, 8)


# -- prefix cache ------------------------------------------------------------------------


def test_repeated_prompt_hits_the_cache() -> None:
    clock, engine = make()
    prompt = Prompt.from_tokens(toks(2, 1000))
    first = engine.submit(SimRequest(prompt, 5))
    clock.run()
    again = engine.submit(SimRequest(prompt, 5))
    clock.run()
    partial = engine.submit(SimRequest(Prompt.from_tokens(toks(2, 500) + toks(3, 500)), 5))
    clock.run()
    assert first.cached_tokens == 0
    assert again.cached_tokens == 992  # 62 full blocks
    assert partial.cached_tokens == 496  # the shared 500 tokens, in whole blocks
    assert again.ttft == pytest.approx(PROFILE.prefill_time(1000, cached=992), rel=1e-9)
    m = engine.metrics()
    assert m.prefix_hits_tokens == 992 + 496
    assert m.prefix_queries_tokens == 3000
    settled(engine)


@pytest.mark.parametrize("tile", [1, 16, None])
def test_a_suffix_on_a_cached_prefix_costs_the_profiles_kv_reads(tile: int | None) -> None:
    """The engine's step for a short suffix on a long cached prefix is the profile's: the
    prefix's KV read once per query tile of the suffix."""
    profile = PROFILE.model_copy(
        update={"efficiency": PROFILE.efficiency.model_copy(update={"attention_query_tile": tile})}
    )
    clock = VirtualClock()
    engine = Engine(profile, clock, EngineConfig())
    engine.submit(SimRequest(Prompt.from_tokens(toks(4, 4096)), 1))
    clock.run()
    suffix = engine.submit(SimRequest(Prompt.from_tokens(toks(4, 4096) + toks(5, 40)), 1))
    clock.run()
    assert suffix.cached_tokens == 4096
    assert suffix.ttft == pytest.approx(profile.prefill_time(4136, cached=4096), rel=1e-9)


def test_output_blocks_are_cached_for_the_next_turn() -> None:
    clock, engine = make()
    prompt, answer = toks(4, 300), toks(5, 200)
    engine.submit(SimRequest(Prompt.from_tokens(prompt), output_tokens=answer))
    clock.run()
    turn2 = engine.submit(SimRequest(Prompt.from_tokens(prompt + answer + toks(6, 100)), 5))
    clock.run()
    # The prompt and the KV of all but the last generated token were cached.
    assert turn2.cached_tokens == (300 + 200 - 1) // 16 * 16
    settled(engine)


def test_lru_evicts_least_recently_used_first_and_a_sequence_tail_first() -> None:
    clock, engine = make(kv_capacity_blocks=40)
    a, b, c, d, e, f, g = (Prompt.from_tokens(toks(10 + i, 160)) for i in range(7))

    def run(p: Prompt) -> SimRequest:
        r = engine.submit(SimRequest(p, 1))
        clock.run()
        return r

    for p in (a, b, c):  # 10 blocks each; 10 of 40 blocks stay free
        run(p)
    assert run(a).cached_tokens == 159  # touching A makes it most recently used
    run(d)  # takes the free blocks
    run(e)  # evicts the least recently used: B
    assert engine.probe(b) == 0 and engine.probe(a) == 159 and engine.probe(c) == 159
    run(f)  # next: C
    assert engine.probe(c) == 0 and engine.probe(a) == 159
    run(Prompt.from_tokens(toks(30, 80)))  # 5 blocks: the tail half of A goes first
    assert engine.probe(a) == 80
    assert engine.metrics().evicted_blocks == 25
    del g
    settled(engine)


# -- pins ----------------------------------------------------------------------------------


def _fill(engine: Engine, clock: VirtualClock, at: float, seed: int, n: int = 160) -> None:
    engine.submit_at(at, SimRequest(Prompt.from_tokens(toks(seed, n)), 1))
    clock.run_until(at + 0.5)


def test_pin_survives_pressure_until_its_deadline_and_not_after() -> None:
    clock, engine = make(kv_capacity_blocks=40)
    pinned = Prompt.from_tokens(toks(50, 160))
    engine.submit(SimRequest(pinned, 1, program_id="p", pin_ttl_s=10.0))
    clock.run_until(0.5)
    assert engine.metrics().pins_active == 1
    for i in range(6):  # 60 blocks of other work through 30 unpinned blocks
        _fill(engine, clock, 1.0 + i, seed=60 + i)
    assert engine.probe(pinned) == 159
    assert engine.metrics().evicted_blocks > 0
    clock.run_until(10.5)  # past the deadline
    m = engine.metrics()
    assert m.pins_active == 0 and m.pins_expired == 1 and m.pins_released == 1
    assert engine.probe(pinned) == 159  # unpinned but not yet evicted
    for i in range(4):
        _fill(engine, clock, 11.0 + i, seed=70 + i)
    assert engine.probe(pinned) == 0
    settled(engine)


@pytest.mark.parametrize("pressure", ["keep", "release"])
def test_pins_give_way_under_pressure_only_by_policy(pressure: str) -> None:
    clock, engine = make(kv_capacity_blocks=40, max_pinned_fraction=1.0, pin_pressure=pressure)
    engine.submit(SimRequest(Prompt.from_tokens(toks(80, 480)), 1, pin_ttl_s=5.0))
    clock.run_until(0.5)
    assert engine.cache.pinned_blocks == 30
    big = engine.submit_at(1.0, SimRequest(Prompt.from_tokens(toks(81, 320)), 1))  # 20 blocks
    clock.run()
    assert big.first_token_time is not None
    if pressure == "keep":
        assert big.first_token_time > 5.0  # waited for the pin's deadline
        assert engine.metrics().pins_expired == 1
    else:
        assert big.first_token_time < 1.5  # the pin was released for it
        assert engine.metrics().pins_expired == 0
        assert engine.metrics().pins_released == 1
    settled(engine)


def test_pin_limit_refuses_pins_beyond_the_fraction() -> None:
    clock, engine = make(kv_capacity_blocks=40, max_pinned_fraction=0.5)
    engine.submit(SimRequest(Prompt.from_tokens(toks(90, 480)), 1, pin_ttl_s=5.0))
    clock.run()
    assert engine.metrics().pins_refused == 1 and engine.metrics().pins_set == 0


def test_pin_is_released_by_the_programs_next_request_api_and_last_step() -> None:
    clock, engine = make()
    ctx = toks(100, 400)
    engine.submit(SimRequest(Prompt.from_tokens(ctx), 1, program_id="p", pin_ttl_s=30.0))
    clock.run_until(1.0)
    assert engine.pinned_programs() == ["p"]
    nxt = engine.submit(
        SimRequest(Prompt.from_tokens(ctx + toks(101, 50)), 1, program_id="p", pin_ttl_s=30.0)
    )
    clock.run_until(2.0)
    assert nxt.cached_tokens == 400
    m = engine.metrics()
    assert m.pins_set == 2 and m.pins_released == 1 and m.pins_active == 1  # handed over
    assert engine.release_pins("p") == 1 and engine.metrics().pins_active == 0
    assert engine.release_pins("p") == 0
    engine.submit(SimRequest(Prompt.from_tokens(ctx), 1, program_id="q", pin_ttl_s=30.0))
    clock.run_until(3.0)
    last = SimRequest(Prompt.from_tokens(ctx), 1, program_id="q", pin_ttl_s=30.0)
    last.is_last_step = True
    engine.submit(last)
    clock.run_until(4.0)
    m = engine.metrics()
    assert m.pins_active == 0 and m.pins_set == 3 and m.pins_expired == 0
    clock.run()
    settled(engine)


def test_a_pin_is_held_past_its_deadline_while_the_programs_next_request_waits() -> None:
    clock, engine = make(max_num_seqs=1)
    ctx = toks(110, 320)
    engine.submit(SimRequest(Prompt.from_tokens(ctx), 1, program_id="p", pin_ttl_s=1.0))
    clock.run_until(0.5)
    hog = engine.submit(SimRequest(Prompt.from_tokens(toks(111, 16)), 3000))  # the one seat
    clock.run_until(0.6)
    nxt = engine.submit(SimRequest(Prompt.from_tokens(ctx + toks(112, 16)), 1, program_id="p"))
    clock.run_until(5.0)  # the deadline (about 1.1 s) passed; the next request still waits
    assert not nxt.first_token_time and engine.pinned_programs() == ["p"]
    clock.run()
    assert hog.finished and nxt.cached_tokens == 320  # the pin kept its context
    m = engine.metrics()
    assert m.pins_active == 0 and m.pins_expired == 1
    settled(engine)


def test_continuum_releases_a_pin_when_the_jobs_next_request_finishes() -> None:
    clock, engine = make(pin_release="finished")
    ctx = toks(120, 320)
    engine.submit(SimRequest(Prompt.from_tokens(ctx), 1, program_id="p", pin_ttl_s=30.0))
    clock.run_until(1.0)
    nxt = engine.submit(SimRequest(Prompt.from_tokens(ctx + toks(121, 16)), 400, program_id="p"))
    clock.run_until(1.2)
    assert nxt.first_token_time and not nxt.finished
    assert engine.pinned_programs() == ["p"]  # scheduled is not enough ...
    clock.run()
    assert engine.metrics().pins_released == 1 and engine.pinned_programs() == []  # ... done is
    settled(engine)


@pytest.mark.parametrize("running", [1, 2])
def test_continuum_drops_a_pin_only_when_no_running_request_can_give_way(running: int) -> None:
    clock, engine = make(
        kv_capacity_blocks=60,
        pin_pressure="last_resort",
        max_pinned_fraction=1.0,
        policy="program",
        pin_release="finished",
    )
    early = engine.submit(
        SimRequest(Prompt.from_tokens(toks(130, 320)), 1, program_id="a", pin_ttl_s=50.0)
    )
    late = engine.submit(
        SimRequest(Prompt.from_tokens(toks(131, 320)), 1, program_id="b", pin_ttl_s=60.0)
    )
    clock.run_until(1.0)
    assert early.finished and late.finished and engine.cache.pinned_blocks == 40
    # 20 blocks are free: one request that outgrows them, or two that fit one at a time
    out = 400 if running == 1 else 190
    growing = [
        engine.submit(SimRequest(Prompt.from_tokens(toks(140 + i, 16)), out, program_id=f"g{i}"))
        for i in range(running)
    ]
    clock.run()
    m = engine.metrics()
    if running == 1:
        # nothing else can give way: the pin with the latest deadline ("b") goes; "a" lasts
        assert m.preemptions == 0 and m.pins_released == 2 and m.pins_expired == 1
    else:
        # another running request can be preempted instead: both pins last to their deadline
        assert m.preemptions >= 1 and m.pins_expired == 2
    assert all(g.output_tokens == out for g in growing)
    settled(engine)


def test_continuum_preempts_a_request_that_is_not_a_last_step_first() -> None:
    clock, engine = make(kv_capacity_blocks=30, policy="program")
    last = SimRequest(Prompt.from_tokens(toks(150, 16)), 300, program_id="late-job")
    last.is_last_step = True
    early = engine.submit(SimRequest(Prompt.from_tokens(toks(151, 16)), 300, program_id="early"))
    clock.run_until(0.01)
    engine.submit(last)
    clock.run()
    # by job order the later job's request would go; it is a last step, so the other does
    assert early.num_preemptions >= 1 and last.num_preemptions == 0
    settled(engine)


# -- preemption ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority", "program"])
def test_preemption_never_loses_a_request_under_heavy_overload(policy: str) -> None:
    rng = random.Random(7)
    clock, engine = make(kv_capacity_blocks=200, policy=policy, max_num_seqs=64)
    reqs = []
    for i in range(150):
        r = SimRequest(
            Prompt.from_tokens(toks(200 + i % 40, rng.randrange(100, 600))),
            rng.randrange(50, 400),
            priority=rng.randrange(3),
            program_id=f"p{i % 20}",
        )
        reqs.append(engine.submit_at(rng.uniform(0.0, 1.0), r))
    clock.run()
    assert all(r.finished for r in reqs)
    assert all(r.output_tokens == r.output_len for r in reqs)
    assert all(r.first_token_time is not None and r.finish_time is not None for r in reqs)
    m = engine.metrics()
    assert m.preemptions > 0 and m.recomputed_tokens > 0
    assert sum(r.num_preemptions for r in reqs) == m.preemptions
    assert sum(r.recomputed_tokens for r in reqs) == m.recomputed_tokens
    assert m.finished == 150 and m.generation_tokens == sum(r.output_len for r in reqs)
    assert engine.kv_usage == 0.0
    settled(engine)


@pytest.mark.parametrize(("policy", "victim"), [("priority", "low"), ("fcfs", "late")])
def test_preemption_picks_the_lowest_priority_latest_arrival(policy: str, victim: str) -> None:
    clock, engine = make(kv_capacity_blocks=20, policy=policy)
    # Each needs 19 blocks by its end; together they cannot both fit.
    early = engine.submit(SimRequest(Prompt.from_tokens(toks(300, 16)), 300, priority=5))
    late = engine.submit(SimRequest(Prompt.from_tokens(toks(301, 16)), 300, priority=0))
    clock.run()
    low_or_late = early if victim == "low" else late
    other = late if victim == "low" else early
    assert low_or_late.num_preemptions >= 1 and other.num_preemptions == 0
    assert early.output_tokens == late.output_tokens == 300
    settled(engine)


# -- scheduling policies -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_policy_runs_lower_values_first(policy: str) -> None:
    clock, engine = make(policy=policy, max_num_seqs=1)
    order: list[int] = []
    for i, prio in enumerate([3, 1, 4, 0, 2]):
        engine.submit_at(
            0.0,  # all at once: the first plan sees them all
            SimRequest(
                Prompt.from_tokens(toks(400 + i, 64)),
                20,
                priority=prio,
                on_finish=lambda r: order.append(r.priority),
            ),
        )
    clock.run()
    assert order == ([0, 1, 2, 3, 4] if policy == "priority" else [3, 1, 4, 0, 2])


@pytest.mark.parametrize("policy", ["fcfs", "program"])
def test_program_policy_prefers_pinned_then_earliest_program(policy: str) -> None:
    clock, engine = make(policy=policy, max_num_seqs=2)

    def req(prog: str, seed: int, out: int, pin: float | None = None) -> SimRequest:
        return SimRequest(Prompt.from_tokens(toks(seed, 64)), out, program_id=prog, pin_ttl_s=pin)

    engine.submit_at(0.0, req("Y", 500, 600))  # holds one seat a long time
    engine.submit_at(0.01, req("Z", 501, 3, pin=100.0))  # short; pins its KV
    engine.submit_at(0.05, req("W", 502, 900))  # takes the other seat
    u1 = engine.submit_at(0.08, req("U", 503, 5))
    y2 = engine.submit_at(0.10, req("Y", 504, 5))
    z2 = engine.submit_at(0.20, req("Z", 505, 5))
    clock.run()
    starts = {name: r.first_token_time or 0.0 for name, r in (("U", u1), ("Y", y2), ("Z", z2))}
    expected = ["Z", "Y", "U"] if policy == "program" else ["U", "Y", "Z"]
    assert sorted(starts, key=starts.__getitem__) == expected
    settled(engine)


# -- batching ------------------------------------------------------------------------------


def test_chunked_prefill_respects_the_token_budget_and_seat_limit() -> None:
    clock, engine = make(max_num_batched_tokens=512, max_num_seqs=8)
    steps: list[StepInfo] = []
    engine.on_step = steps.append
    lone = engine.submit(SimRequest(Prompt.from_tokens(toks(600, 2000)), 3))
    clock.run()
    assert [s.prefill_tokens for s in steps[:4]] == [512, 512, 512, 464]
    steps.clear()
    rng = random.Random(3)
    for i in range(40):
        engine.submit_at(
            rng.uniform(0, 2), SimRequest(Prompt.from_tokens(toks(700 + i, 1500)), 100)
        )
    clock.run()
    assert all(s.decode_requests + s.prefill_tokens <= 512 for s in steps)
    assert all(s.decode_requests + s.prefill_requests <= 8 for s in steps)
    assert any(s.decode_requests and s.prefill_tokens for s in steps)  # mixed steps exist
    assert max(s.decode_requests + s.prefill_tokens for s in steps) == 512
    assert lone.ttft is not None and lone.ttft > PROFILE.prefill_time(2000)  # 4 small steps
    settled(engine)


def test_decode_runs_in_one_event_equal_single_steps() -> None:
    """The closed-form jump over identical decode steps changes no result."""

    def run(max_jump: int | None) -> tuple[list[tuple[float, float, int, int]], int]:
        rng = random.Random(11)
        clock, engine = make(
            kv_capacity_blocks=120,
            max_num_batched_tokens=512,
            max_num_seqs=16,
            policy="program",
            max_jump_steps=max_jump,
        )
        reqs = []
        t = 0.0
        for i in range(120):
            t += rng.expovariate(30)
            prog = f"p{rng.randrange(15)}"
            segments = [("sys", 300)] + [(f"{prog}-{j}", rng.randrange(20, 200)) for j in range(2)]
            reqs.append(
                engine.submit_at(
                    t,
                    SimRequest(
                        Prompt.from_segments(segments),
                        rng.randrange(1, 150),
                        output_key=f"out-{i}",
                        program_id=prog,
                        pin_ttl_s=rng.choice([None, 0.05, 0.5]),
                    ),
                )
            )
        clock.run()
        settled(engine)
        rows = [
            (
                r.first_token_time or 0.0,
                r.finish_time or 0.0,
                r.cached_tokens or 0,
                r.recomputed_tokens,
            )
            for r in reqs
        ]
        return rows, clock.events_run

    jumped, events_jumped = run(None)
    stepped, events_stepped = run(1)
    assert events_jumped < events_stepped / 3
    for a, b in zip(jumped, stepped, strict=True):
        assert a[0] == pytest.approx(b[0], rel=1e-9) and a[1] == pytest.approx(b[1], rel=1e-9)
        assert a[2:] == b[2:]


# -- edges ---------------------------------------------------------------------------------


def test_abort_frees_everything() -> None:
    clock, engine = make(max_num_seqs=2)
    finished: list[SimRequest] = []
    gone = engine.submit(SimRequest(Prompt.from_tokens(toks(800, 3000)), 500))
    stays = engine.submit(
        SimRequest(Prompt.from_tokens(toks(801, 100)), 200, on_finish=finished.append)
    )
    queued = engine.submit(SimRequest(Prompt.from_tokens(toks(802, 100)), 50))
    clock.run_until(0.5)  # `gone` is mid-decode, `queued` waits for a seat
    assert engine.abort(gone) and gone.aborted and not engine.abort(gone)
    assert engine.abort(queued) and engine.num_waiting == 0
    clock.run()
    assert finished == [stays] and 0 < gone.output_tokens < 500
    assert queued.output_tokens == 0 and queued.first_token_time is None
    assert engine.metrics().aborted == 2
    settled(engine)


def test_requests_that_can_never_fit_are_refused() -> None:
    _, engine = make(kv_capacity_blocks=10)
    with pytest.raises(ValueError, match="KV capacity"):
        engine.submit(SimRequest(Prompt.anonymous(200), 10))
    _, engine = make()
    with pytest.raises(ValueError, match="context length"):
        engine.submit(SimRequest(Prompt.anonymous(131_000), 1000))
    with pytest.raises(ValueError):
        SimRequest(Prompt.anonymous(10), 0)


def test_mooncake_replay_on_eight_replicas() -> None:
    rows = load_mooncake(MOONCAKE, limit=600)
    clock = VirtualClock()
    engines = [Engine(PROFILE, clock, name=f"r{i}") for i in range(8)]
    reqs = replay(rows, engines, rate_scale=2.0)
    assert all(
        r.finished and r.output_tokens == max(1, row.output_length)
        for r, row in zip(reqs, rows, strict=True)
    )
    assert {r.replica for r in reqs} == {f"r{i}" for i in range(8)}
    assert sum(e.metrics().prefix_hits_tokens for e in engines) > 0
    assert all(0 <= (r.cached_tokens or 0) < r.prompt_tokens for r in reqs)
    for e in engines:
        settled(e)
