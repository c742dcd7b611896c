"""Error handlers (`on_error: handler`, filtered by `catch`), the map element's index
(`INDEX` / `$index`), and a map's partial-failure policy (`max_failures`)."""

from __future__ import annotations

import anyio
import pytest

from treadle import (
    ERROR,
    INDEX,
    ITEM,
    ErrorInfo,
    Graph,
    GraphValidationError,
    Runtime,
    step,
)
from treadle.graphs.kinds import ElementResult
from treadle.runtime.core.events import NodeFailed, NodeFinished

pytestmark = pytest.mark.anyio


def flaky(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x * 10


async def test_a_handler_gets_the_error_as_a_value_and_replaces_the_output() -> None:
    seen: list[ErrorInfo] = []

    def recover(error: ErrorInfo, x: int) -> int:
        seen.append(error)
        return -x

    g = Graph("handled", inputs={"x": int})
    out = g.func(
        "work",
        flaky,
        inputs={"x": g.input.x},
        retries=1,
        backoff_s=0,
        on_error="handler",
        handler=step.func(recover, inputs={"error": ERROR, "x": g.input.x}),
    )
    g.output(value=out)
    result = await Runtime().run(g, {"x": 3})
    assert result.output.value == -3
    assert seen == [ErrorInfo(type="ValueError", message="ValueError: odd 3", node="work",
                              attempt=2)]  # fmt: skip
    failed = [(e.node, e.policy) for e in result.events if isinstance(e, NodeFailed)]
    assert failed == [("work", "handler")]
    finished = [e.node for e in result.events if isinstance(e, NodeFinished)]
    assert finished == ["work/on_error", "work"]
    assert (await Runtime().run(g, {"x": 4})).output.value == 40  # no error, no handler


async def test_catch_filters_by_error_type_and_a_timeout_is_a_node_timeout() -> None:
    async def slow(x: int) -> int:
        await anyio.sleep(10)
        return x

    def fallback_value(message: str) -> int:
        return len(message)

    g = Graph("timeouts", inputs={"x": int})
    out = g.func(
        "slow",
        slow,
        inputs={"x": g.input.x},
        timeout_s=0.02,
        on_error="handler",
        catch=["NodeTimeout"],
        handler=step.func(fallback_value, inputs={"message": ERROR.message}),
    )
    g.output(value=out)
    result = await Runtime().run(g, {"x": 1})
    assert result.output.value == len("timed out after 0.02 s")

    h = Graph("uncaught", inputs={"x": int})
    h.output(value=h.func("work", flaky, inputs={"x": h.input.x}, on_error="handler",
                          catch=["NodeTimeout"],
                          handler=step.func(lambda: 0)).out)  # fmt: skip
    failed = await Runtime().run(h, {"x": 1}, check=False)
    assert failed.status == "failed" and "odd 1" in (failed.error or "")


async def test_handlers_are_checked_when_compiled() -> None:
    g = Graph("bad", inputs={"x": int})
    g.func("work", flaky, inputs={"x": g.input.x}, on_error="handler",
           handler=step.func(lambda error: "text", inputs={"error": ERROR}))  # fmt: skip

    def returns_str(error: ErrorInfo) -> str:
        return error.message

    g2 = Graph("bad2", inputs={"x": int})
    g2.func("work", flaky, inputs={"x": g2.input.x}, on_error="handler",
            handler=step.func(returns_str, inputs={"error": ERROR}))  # fmt: skip
    g2.func("stray", lambda e: e, inputs={"e": ERROR})
    with pytest.raises(GraphValidationError) as err:
        g2.compile()
    text = str(err.value)
    assert "the handler's output (str) does not fit the node's (int)" in text
    assert "$error is only defined inside an on_error handler" in text
    g3 = Graph("bad3", inputs={"x": int})
    g3.func("work", flaky, inputs={"x": g3.input.x}, on_error="handler")
    with pytest.raises(GraphValidationError, match="on_error: handler and a `handler` node"):
        g3.compile()
    assert g.compile()  # an unannotated handler is not refused


async def test_map_elements_bind_their_index() -> None:
    g = Graph("numbered", inputs={"names": list[str]})
    lines = g.map(
        "lines",
        g.input.names,
        step.func(lambda name, i: f"{i}. {name}", inputs={"name": ITEM, "i": INDEX}),
    )
    g.output(lines=lines)  # fmt: skip
    result = await Runtime().run(g, {"names": ["ada", "bob", "cy"]})
    assert result.output.lines == ["0. ada", "1. bob", "2. cy"]
    bad = Graph("outside", inputs={"n": int})
    bad.func("f", lambda i: i, inputs={"i": INDEX})
    with pytest.raises(GraphValidationError, match=r"\$index is only defined inside a map"):
        bad.compile()


async def test_max_failures_reports_each_element_and_fails_past_the_limit() -> None:
    g = Graph("partial", inputs={"xs": list[int]})
    out = g.map("work", g.input.xs, step.func(flaky, inputs={"x": ITEM}), max_failures=2)
    g.output(results=out)
    cg = g.compile()
    assert cg.nodes["work"].output_type == list[ElementResult[int]]
    result = await Runtime().run(cg, {"xs": [2, 3, 4, 5]})
    results = result.output.results
    assert [(r.index, r.value, r.ok) for r in results] == [
        (0, 20, True), (1, None, False), (2, 40, True), (3, None, False),
    ]  # fmt: skip
    assert results[1].error == ErrorInfo(type="ValueError", message="ValueError: odd 3",
                                         node="work[1]")  # fmt: skip
    too_many = await Runtime().run(cg, {"xs": [1, 3, 5]}, check=False)
    assert too_many.status == "failed"
    assert "3 elements failed (max_failures 2)" in (too_many.error or "")
