"""Native parallel function calling: an `llm` node whose model asks for several tools in
one turn runs them concurrently, within each tool's concurrency limit and timeout, and
hands every result — errors included — back to the model. By event order, never timing."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from treadle import Graph, RunResult, Runtime, ScriptedBackend, ScriptRule
from treadle.backends.base import Backend, Capabilities, LLMRequest, LLMResponse, ToolCall
from treadle.backends.scripted import ScriptedToolCall
from treadle.runtime.core.events import Event, ToolCallFinished, ToolCallStarted
from treadle.tools import Tool, tool

pytestmark = pytest.mark.anyio

LIMIT_S = 10
b_started = anyio.Event()


@tool
async def tool_a(x: str) -> str:
    """Finishes only after tool_b has started."""
    await b_started.wait()
    return f"a:{x}"


@tool
async def tool_b(x: str) -> str:
    """Starts, and lets tool_a finish."""
    b_started.set()
    return f"b:{x}"


@tool
async def broken(x: str) -> str:
    """Always fails."""
    raise RuntimeError(f"disk on fire ({x})")


@tool(timeout_s=0.05)
async def hangs(x: str) -> str:
    """Never returns in time."""
    await anyio.sleep(30)
    return x


inflight = {"now": 0, "max": 0}


@tool(max_concurrency=1)
async def single(x: str) -> str:
    """At most one call at a time."""
    inflight["now"] += 1
    inflight["max"] = max(inflight["max"], inflight["now"])
    await anyio.sleep(0)
    inflight["now"] -= 1
    return f"s:{x}"


def llm_graph(tools: list[Tool], max_turns: int = 4) -> Graph:
    g = Graph("native", inputs={"q": str})
    n = g.llm("ask", "Task: {q}", tools=tools, inputs={"q": g.input.q}, max_turns=max_turns)
    g.output(answer=n.out)
    return g


def calls_then_echo(*calls: tuple[str, dict[str, Any]]) -> ScriptedBackend:
    return ScriptedBackend(
        [
            ScriptRule(
                match="Task:",
                tool_calls=[ScriptedToolCall(name=n, arguments=a) for n, a in calls],
            ),
            ScriptRule(match="Task:", content="results:\n{tool_results}"),
        ]
    )


async def run(g: Graph, backend: Backend) -> RunResult:
    with anyio.fail_after(LIMIT_S):
        return await Runtime(models={"default": backend}).run(g, {"q": "go"})


def seq(events: list[Event], cls: type[Event], tool_name: str) -> int:
    return next(
        e.seq for e in events if isinstance(e, cls) and getattr(e, "tool", None) == tool_name
    )


async def test_calls_of_one_turn_overlap_and_results_go_back_in_order() -> None:
    global b_started
    b_started = anyio.Event()
    backend = calls_then_echo(("tool_a", {"x": "1"}), ("tool_b", {"x": "2"}))
    result = await run(llm_graph([tool_a, tool_b]), backend)
    assert result.output.answer == "results:\na:1\nb:2"
    ev = result.events
    assert seq(ev, ToolCallStarted, "tool_b") < seq(ev, ToolCallFinished, "tool_a")


async def test_errors_come_back_to_the_model_as_results() -> None:
    backend = calls_then_echo(
        ("broken", {"x": "1"}),
        ("hangs", {"x": "2"}),
        ("tool_b", {"y": "wrong"}),
        ("nosuch", {}),
        ("tool_b", {"x": "ok"}),
    )
    result = await run(llm_graph([broken, hangs, tool_b]), backend)
    lines = result.output.answer.splitlines()[1:]
    assert lines[0] == "error: RuntimeError: disk on fire (1)"
    assert lines[1] == "error: timed out after 0.05 s"
    assert lines[2].startswith("error: invalid arguments: x: required, but missing")
    assert lines[3].startswith("error: unknown tool 'nosuch'")
    assert lines[4] == "b:ok"
    failed = [e for e in result.events if isinstance(e, ToolCallFinished) and not e.ok]
    assert len(failed) == 4


async def test_a_tools_concurrency_limit_holds_inside_one_turn() -> None:
    inflight.update(now=0, max=0)
    backend = calls_then_echo(*[("single", {"x": str(i)}) for i in range(4)])
    result = await run(llm_graph([single]), backend)
    assert result.output.answer == "results:\ns:0\ns:1\ns:2\ns:3"
    assert inflight["max"] == 1


class AlwaysCalls:
    """A model that asks for a tool on every turn."""

    def __init__(self) -> None:
        self.turns = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def generate(self, request: LLMRequest) -> LLMResponse:
        self.turns += 1
        call = ToolCall(id=f"c{self.turns}", name="tool_b", arguments='{"x": "again"}')
        return LLMResponse(tool_calls=[call], finish_reason="tool_calls")


async def test_the_turn_limit_stops_a_model_that_keeps_calling_tools() -> None:
    backend = AlwaysCalls()
    with anyio.fail_after(LIMIT_S):
        result = await Runtime(models={"default": backend}).run(
            llm_graph([tool_b], max_turns=3), {"q": "go"}, check=False
        )
    assert not result.ok
    assert "after 3 turns (max_turns)" in (result.error or "")
    assert backend.turns == 3
    assert sum(isinstance(e, ToolCallStarted) for e in result.events) == 2
