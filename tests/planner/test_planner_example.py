"""The planner example runs offline over real tools, as Python and as a workflow file."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle import Runtime, load_workflow
from treadle.examples import planner_math
from treadle.runtime.core.events import NodeFinished, ToolCallStarted

EXAMPLES = Path(planner_math.__file__).parent


def test_the_workflow_file_is_the_same_program() -> None:
    assert load_workflow(str(EXAMPLES / "planner_math.yaml")) == planner_math.graph.spec


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["python", "yaml"])
async def test_the_example_values_the_stock(source: str) -> None:
    graph = (
        planner_math.graph
        if source == "python"
        else load_workflow(str(EXAMPLES / "planner_math.yaml"))
    )
    result = await Runtime().run(graph)
    value = result.output.value
    assert value == planner_math.StockValue(
        total=1250 * 12.5 + 980 * 13.0,
        by_warehouse={"north": 1250 * 12.5, "south": 980 * 13.0},
        currency="USD",
    )
    tools = [e.tool for e in result.events if isinstance(e, ToolCallStarted)]
    assert sorted(tools) == ["calculator"] * 3 + ["read_file"] * 2
    finished = {e.node for e in result.events if isinstance(e, NodeFinished)}
    assert {f"value/task{i}" for i in range(1, 6)} <= finished
