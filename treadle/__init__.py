"""treadle: an async runtime for agent workflows.

Declare a program as a typed DAG (`Graph`), run it with a `Runtime`:

    from treadle import Graph, Runtime
    g = Graph("hello", inputs={"name": str})
    greet = g.llm("greet", "Say hello to {name}.", inputs={"name": g.input.name})
    g.output(text=greet.out)
    result = treadle.run_sync(g, {"name": "Ada"})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio

from treadle.backends import (
    Backend,
    Capabilities,
    LLMRequest,
    LLMResponse,
    Message,
    ScriptedBackend,
    ScriptRule,
    ToolCall,
    Usage,
)
from treadle.errors import (
    BackendError,
    DaemonError,
    GatewayError,
    GraphError,
    RunError,
    SetupError,
    StoreError,
    ToolError,
    TreadleError,
)
from treadle.graphs.analysis import GraphFacts, LLMFacts
from treadle.graphs.builder import ERROR_REF as ERROR
from treadle.graphs.builder import INDEX_REF as INDEX
from treadle.graphs.builder import ITEM_REF as ITEM
from treadle.graphs.builder import Graph, NodeHandle, Out, first_of, step
from treadle.graphs.compile import CompiledGraph, GraphValidationError, compile_graph
from treadle.graphs.kinds import (
    BranchNode,
    FuncNode,
    LLMNode,
    MapNode,
    PlannerNode,
    SubgraphNode,
    ToolNode,
)
from treadle.graphs.spec import (
    CacheOptions,
    ErrorInfo,
    FirstOf,
    GraphSpec,
    InputSpec,
    NodeOptions,
    NodeSpec,
    Ref,
)
from treadle.runtime import (
    Event,
    InvalidInputs,
    InvalidModel,
    MemoryStore,
    NodeError,
    RunCancelled,
    RunFailed,
    RunHandle,
    RunRecord,
    RunResult,
    RunStatus,
    Runtime,
    StateStore,
)
from treadle.runtime.core import events
from treadle.runtime.core.context import LLMCall, ToolInvocation
from treadle.runtime.core.interceptors import CallInterceptor, ExtraHeaders
from treadle.tools import Tool, ToolArgumentError, tool

__version__ = "0.1.0"


def load_workflow(path: str) -> GraphSpec:
    """Load a workflow file (YAML or JSON) into the same `GraphSpec` the SDK builds."""
    from treadle.graphs.files.loader import load_workflow as _load

    return _load(path)


def run_sync(
    graph: Graph | GraphSpec | CompiledGraph,
    inputs: Mapping[str, Any] | None = None,
    *,
    runtime: Runtime | None = None,
) -> RunResult:
    """Run a graph to completion from synchronous code (raises `RunFailed` on failure)."""
    rt = runtime or Runtime()

    async def main() -> RunResult:
        return await rt.run(graph, inputs)

    return anyio.run(main)


__all__ = [
    "ERROR",
    "INDEX",
    "ITEM",
    "Backend",
    "BackendError",
    "BranchNode",
    "CacheOptions",
    "CallInterceptor",
    "Capabilities",
    "CompiledGraph",
    "DaemonError",
    "ErrorInfo",
    "Event",
    "ExtraHeaders",
    "FirstOf",
    "FuncNode",
    "GatewayError",
    "Graph",
    "GraphError",
    "GraphFacts",
    "GraphSpec",
    "GraphValidationError",
    "InputSpec",
    "InvalidInputs",
    "InvalidModel",
    "LLMCall",
    "LLMFacts",
    "LLMNode",
    "LLMRequest",
    "LLMResponse",
    "MapNode",
    "MemoryStore",
    "Message",
    "NodeError",
    "NodeHandle",
    "NodeOptions",
    "NodeSpec",
    "Out",
    "PlannerNode",
    "Ref",
    "RunCancelled",
    "RunError",
    "RunFailed",
    "RunHandle",
    "RunRecord",
    "RunResult",
    "RunStatus",
    "Runtime",
    "ScriptRule",
    "ScriptedBackend",
    "SetupError",
    "StateStore",
    "StoreError",
    "SubgraphNode",
    "Tool",
    "ToolArgumentError",
    "ToolCall",
    "ToolError",
    "ToolInvocation",
    "ToolNode",
    "TreadleError",
    "Usage",
    "compile_graph",
    "events",
    "first_of",
    "load_workflow",
    "run_sync",
    "step",
    "tool",
]
