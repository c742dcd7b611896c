"""Shared material for the observability tests: a sample workflow that exercises every
kind of span (a retried node, a map fan-out over a subgraph, a subgraph, an LLM node whose
model calls two tools at once, a node that fails under the `skip` policy), and a builder
of synthetic journals with exact timestamps."""

from __future__ import annotations

from typing import Any

import anyio

from treadle import ITEM, Graph, ScriptedBackend, ScriptRule, step
from treadle.backends.scripted import ScriptedToolCall
from treadle.runtime.core.events import Event
from treadle.tools import tool

#: epoch seconds of synthetic journals (exactly representable steps of 1/1024 s)
T0 = 1_700_000_000.0


@tool
def lookup(city: str) -> str:
    """Look up the weather of a city.

    Args:
        city: the city's name
    """
    return f"{city}: sunny"


def sample_graph() -> Graph:
    attempts = {"n": 0}

    async def flaky(x: int) -> int:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise ConnectionError("transient")
        return x

    async def double(v: int) -> int:
        await anyio.sleep(0)
        return v * 2

    def boom(x: int) -> int:
        raise RuntimeError("nope")

    inner = Graph("inner", inputs={"v": int})
    inner.output(out=inner.func("d", double, inputs={"v": inner.input.v}).out)

    g = Graph("sample", inputs={"x": int, "q": str})
    flaky_node = g.func("flaky", flaky, inputs={"x": g.input.x}, retries=2, backoff_s=0.001)
    items = g.func("items", lambda x: list(range(x)), inputs={"x": flaky_node})
    fan = g.map("fan", items.out, step.subgraph(inner, inputs={"v": ITEM}))
    sub = g.subgraph("sub", inner, inputs={"v": g.input.x})
    ask = g.llm("ask", "Weather in {q}?", inputs={"q": g.input.q}, tools=[lookup])
    g.func("boom", boom, inputs={"x": g.input.x}, on_error="skip", blocking=True)
    g.output(fan=fan.out, sub=sub.out.out, answer=ask.out)
    return g


SAMPLE_INPUTS: dict[str, Any] = {"x": 3, "q": "Oslo"}


def sample_backend() -> ScriptedBackend:
    return ScriptedBackend(
        rules=[
            ScriptRule(
                match="Weather",
                tool_calls=[
                    ScriptedToolCall(name="lookup", arguments={"city": "Oslo"}),
                    ScriptedToolCall(name="lookup", arguments={"city": "Rome"}),
                ],
            )
        ]
    )


class Journal:
    """Synthetic events of one run with chosen times: `j.at(0.5, NodeStarted, node="a")`."""

    def __init__(self, run_id: str = "run-1") -> None:
        self.run_id = run_id
        self.events: list[Event] = []

    def at(self, t: float, cls: type[Event], **fields: Any) -> Event:
        event = cls(len(self.events) + 1, self.run_id, T0 + t, **fields)
        self.events.append(event)
        return event
