"""Runnable example workflows (Python modules and workflow files).

Each module runs on its own too (`python examples/research.py`): `run_and_print` runs its
graph on the defaults and prints the output as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import anyio

from treadle.graphs.builder import Graph
from treadle.runtime.execution.runtime import Runtime


def run_and_print(graph: Graph, inputs: dict[str, Any] | None = None) -> None:
    """Run `graph` (on its embedded models) and print its output, or fail with its error."""

    async def main() -> Any:
        runtime = Runtime()
        try:
            return await runtime.run(graph, inputs)
        finally:
            await runtime.aclose()

    result = anyio.run(main)
    print(json.dumps(result.output.model_dump(mode="json"), indent=2))
