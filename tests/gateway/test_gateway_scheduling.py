"""The gateway's scheduler without HTTP: what each hint does to a program, queueing by
tenant weight when the model is full, and the answer-length estimates."""

from __future__ import annotations

import anyio
import pytest

from treadle.backends.openai_compat.hint_wire import WireHints
from treadle.runtime.gateway.scheduling import GatewayScheduler

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _gateway(limit: int | None = 4, **options: object) -> tuple[GatewayScheduler, Clock]:
    clock = Clock()
    return GatewayScheduler([("m", limit)], clock=clock, **options), clock  # type: ignore[arg-type]


async def _done(gw: GatewayScheduler, hints: WireHints, program: str | None, out: int = 20) -> None:
    admitted = await gw.admit("m", hints, program, 100, None)
    gw.finish(admitted, prompt_tokens=100, cached_tokens=0, completion_tokens=out, ttft_s=0.01,
              ok=True)  # fmt: skip


async def test_hints_shape_a_programs_life() -> None:
    gw, clock = _gateway()
    sched = gw.scheduler
    await _done(gw, WireHints(tenant="a", tool_duration_s=7.0), "p1")
    assert sched.programs["p1"].idle_until == pytest.approx(clock.t + 7.0)
    await _done(gw, WireHints(tenant="a", human_wait=True), "p1")
    assert not sched.programs["p1"].admitted  # suspended: nothing held while a person thinks
    assert sched.suspensions == {"human_wait": 1}
    await _done(gw, WireHints(tenant="a", last_llm_step=True), "p1")
    assert "p1" not in sched.programs and "p1" not in gw.programs
    assert gw.closed_programs == {"p1"}  # for the state store to forget
    # a call without a program is a program of its own, closed when it finishes
    await _done(gw, WireHints(), None)
    assert not gw.programs and not sched.programs


async def test_idle_programs_expire_and_end_on_request() -> None:
    gw, clock = _gateway(program_idle_s=60.0)
    await _done(gw, WireHints(tenant="a"), "old")
    await _done(gw, WireHints(tenant="a"), "new")
    clock.t += 50
    await _done(gw, WireHints(tenant="a"), "new")
    clock.t += 20
    assert gw.expire_idle() == 1
    assert set(gw.programs) == {"new"}
    assert gw.end_program("new") and not gw.end_program("new")


async def test_a_full_model_queues_calls_and_serves_tenants_by_weight() -> None:
    gw, _ = _gateway(limit=1, tenant_weights={"gold": 2.0, "silver": 1.0})
    order: list[str] = []
    first = await gw.admit("m", WireHints(tenant="other"), None, 100, 10)  # holds the slot

    async def call(tenant: str, i: int) -> None:
        admitted = await gw.admit("m", WireHints(tenant=tenant, last_llm_step=True), f"{tenant}{i}",
                                  100, 10)  # fmt: skip
        order.append(tenant)
        gw.finish(admitted, prompt_tokens=100, cached_tokens=0, completion_tokens=10,
                  ttft_s=None, ok=True)  # fmt: skip

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(call, "gold", i)
            tg.start_soon(call, "silver", i)
        await anyio.sleep(0.01)
        assert gw.waiting() == 12 and gw.in_flight() == 1
        gw.finish(first, prompt_tokens=100, cached_tokens=0, completion_tokens=10, ttft_s=None,
                  ok=True)  # fmt: skip
    # while both wait, gold gets two calls for each of silver's
    assert order[:9].count("gold") == 6 and order[:9].count("silver") == 3


async def test_answer_length_estimates_learn_from_answers() -> None:
    gw, _ = _gateway()
    cold = await gw.admit("m", WireHints(tenant="a"), "p", 0, None)
    assert cold.call.est_service_s == pytest.approx(256 * 0.002)  # the cap: nothing known
    gw.finish(cold, prompt_tokens=0, cached_tokens=0, completion_tokens=40, ttft_s=None, ok=True)
    warm = await gw.admit("m", WireHints(tenant="b"), "q", 0, None)  # a new tenant: all answers
    assert warm.call.est_service_s == pytest.approx(40 * 0.002)
    capped = await gw.admit("m", WireHints(tenant="a"), "p", 0, 10)  # a cap below the mean
    assert capped.call.est_service_s == pytest.approx(10 * 0.002)
