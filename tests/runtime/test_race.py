"""Races: the first branch to finish wins and the output says which; the others are
cancelled — their cleanup runs, their LLM calls are aborted in the (simulated) engine, the
KV pin one of them holds is released — and a failing branch only drops out."""

from __future__ import annotations

from typing import Literal, get_args

import anyio
import pytest

from treadle import Graph, GraphValidationError, Runtime, ScriptRule, step, tool
from treadle.backends.sim.backend import SimBackend
from treadle.runtime.core.events import NodeSkipped, PinReleased, PinSet
from treadle.runtime.sched.admission import SchedulerAdmission

pytestmark = pytest.mark.anyio


async def test_the_first_branch_wins_and_the_others_are_cancelled_with_cleanup() -> None:
    cleaned: list[str] = []

    async def slow(q: str) -> str:
        try:
            await anyio.sleep(30)
            return "slow " + q
        finally:
            cleaned.append("slow")

    async def fast(q: str) -> str:
        await anyio.sleep(0.01)
        return "fast " + q

    g = Graph("race", inputs={"q": str})
    r = g.race("pick", {"slow": step.func(slow, inputs={"q": g.input.q}),
                        "fast": step.func(fast, inputs={"q": g.input.q})})  # fmt: skip
    g.output(winner=r.out.winner, answer=r.out.output)
    cg = g.compile()
    winner_type = cg.nodes["pick"].output_type.model_fields["winner"].annotation
    assert set(get_args(winner_type)) == {"slow", "fast"} and winner_type.__origin__ is Literal
    with anyio.fail_after(10):
        result = await Runtime().run(cg, {"q": "x"})
    assert (result.output.winner, result.output.answer) == ("fast", "fast x")
    assert cleaned == ["slow"]
    skipped = [(e.node, e.reason) for e in result.events if isinstance(e, NodeSkipped)]
    assert skipped == [("pick/slow", "cancelled: branch 'fast' won")]


async def test_a_failing_branch_drops_out_and_all_failing_fails_the_race() -> None:
    def broken(q: str) -> str:
        raise RuntimeError("no luck")

    async def steady(q: str) -> str:
        await anyio.sleep(0.05)
        return q

    g = Graph("race", inputs={"q": str})
    r = g.race("pick", [step.func(broken, inputs={"q": g.input.q}, id="broken"),
                        step.func(steady, inputs={"q": g.input.q}, id="steady")])  # fmt: skip
    g.output(winner=r.out.winner)
    assert (await Runtime().run(g, {"q": "x"})).output.winner == "steady"

    h = Graph("doomed", inputs={"q": str})
    h.race("pick", {"a": step.func(broken, inputs={"q": h.input.q}),
                    "b": step.func(broken, inputs={"q": h.input.q})})  # fmt: skip
    failed = await Runtime().run(h, {"q": "x"}, check=False)
    assert failed.status == "failed"
    assert "every branch failed (a: RuntimeError: no luck; b: RuntimeError: no luck)" in (
        failed.error or ""
    )


async def test_races_are_checked_when_compiled() -> None:
    g = Graph("bad", inputs={"q": str})
    g.race("one", {"only": step.func(lambda q: q, inputs={"q": g.input.q})})
    with pytest.raises(GraphValidationError, match="a race needs at least two branches"):
        g.compile()


async def test_the_losing_llm_call_is_aborted_in_the_engine() -> None:
    long_answer = " ".join(f"word{i}" for i in range(3000))
    backend = SimBackend(
        rules=[ScriptRule(match="quick", content="short"),
               ScriptRule(match="thorough", content=long_answer)],
        speed=1.0,
    )  # fmt: skip
    g = Graph("prompts", inputs={"q": str})
    r = g.race("answer", {
        "thorough": step.llm("Answer thoroughly: {q}", inputs={"q": g.input.q}),
        "quick": step.llm("Answer quick: {q}", inputs={"q": g.input.q}),
    })  # fmt: skip
    g.output(winner=r.out.winner, text=r.out.output)
    with anyio.fail_after(60):
        result = await Runtime(models={"default": backend}).run(g, {"q": "why?"})
    assert (result.output.winner, result.output.text) == ("quick", "short")
    # the engine takes an aborted request out at the end of the step under way
    with anyio.fail_after(10):
        while backend.metrics().aborted == 0:
            await anyio.sleep(0.01)
    metrics = backend.metrics()
    assert metrics.aborted == 1 and metrics.finished == 1 and metrics.running == 0


@tool(expected_duration_s=60.0)
async def deploy(path: str) -> str:
    """Deploy (declared slow: the model's KV is pinned while it runs)."""
    await anyio.sleep(60)
    return "deployed"


async def test_the_pin_a_losing_branch_holds_is_released() -> None:
    system = " ".join(f"Rule {i}: deploy carefully." for i in range(20))
    backend = SimBackend(
        rules=[
            ScriptRule(match="Ship", tool_calls=[{"name": "deploy", "arguments": {"path": "/"}}])
        ],
        speed=10.0,
        policy="priority",
    )

    async def rollback(task: str) -> str:
        # loses no time once the other branch is in its (slow) tool call with its KV pinned
        while backend.metrics().pins_active == 0:
            await anyio.sleep(0.01)
        return "rolled back " + task

    g = Graph("ship-or-rollback", inputs={"task": str})
    r = g.race("plan", {
        "ship": step.llm("Ship: {task}", system=system, tools=[deploy],
                         inputs={"task": g.input.task}),
        "rollback": step.func(rollback, inputs={"task": g.input.task}),
    })  # fmt: skip
    g.output(result=r.out.winner)
    async with SchedulerAdmission(tools=[deploy]) as admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        with anyio.fail_after(60):
            result = await runtime.run(g, {"task": "v2"})
    assert result.output.result == "rollback"
    pins = [e for e in result.events if isinstance(e, PinSet | PinReleased)]
    assert isinstance(pins[0], PinSet) and pins[0].node == "plan/ship"
    released = [e for e in pins if isinstance(e, PinReleased)]
    assert [(e.node, e.reason) for e in released][:1] == [("plan/ship", "cancelled")]
    assert backend.metrics().pins_active == 0
