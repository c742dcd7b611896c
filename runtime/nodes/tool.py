"""The `tool` node's executor, and every tool call of a run: a tool node's, an `llm`
node's (the model's tool calls of one turn, run at once), a planner's tasks. Each goes
between its `ToolCallStarted` / `ToolCallFinished` events through the runtime's
interceptor chain (`ctx.invoke_tool`) to the tool."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import anyio

from treadle.backends.base import ToolCall
from treadle.graphs.kinds import ToolNode
from treadle.runtime.core.context import RunContext, ToolInvocation
from treadle.runtime.core.errors import NodeError, why_call_ended
from treadle.runtime.core.events import ToolCallFinished, ToolCallStarted
from treadle.runtime.core.values import as_text
from treadle.runtime.nodes.base import NodeCall, NodeExecutor
from treadle.tools import Tool, ToolArgumentError, ToolError


class ToolExecutor(NodeExecutor[ToolNode]):
    spec = ToolNode

    async def run(self, call: NodeCall[ToolNode]) -> Any:
        assert call.spec.tool is not None  # compile refuses a tool node without one
        return await run_tool_node(
            call.ctx, call.spec.tool, call.instance, call.inputs, call.attempt
        )


EXECUTOR = ToolExecutor()


async def run_tool_calls(
    ctx: RunContext, node: str, calls: list[ToolCall], tools: Mapping[str, Tool]
) -> list[str]:
    """Run a model turn's tool calls concurrently; errors become results the model reads."""
    results: list[str] = [""] * len(calls)

    async def one(i: int, call: ToolCall) -> None:
        call_id = f"{node}:{call.id}"
        tool = tools.get(call.name)
        if tool is None:
            known = ", ".join(tools)
            results[i] = f"error: unknown tool {call.name!r} (available: {known})"
            ctx.emit(ToolCallStarted, node=node, call_id=call_id, tool=call.name)
            ctx.emit(
                ToolCallFinished,
                node=node,
                call_id=call_id,
                tool=call.name,
                duration_s=0.0,
                ok=False,
                error=results[i],
            )
            return
        try:
            value = await call_tool(
                ctx, tool, node, call_id, call.arguments, key=f"{ctx.run_id}:{call_id}"
            )
            results[i] = as_text(value)
        except ToolError as exc:
            results[i] = f"error: {exc.reason}"

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return results


async def call_tool(
    ctx: RunContext,
    tool: Tool,
    node: str,
    call_id: str,
    arguments: dict[str, Any] | str | None,
    *,
    key: str,
) -> Any:
    """Invoke a tool between its `ToolCallStarted` / `ToolCallFinished` events. A tool that
    is not idempotent receives `key` as its idempotency key; a `ToolError` is re-raised
    after its event."""
    ctx.emit(ToolCallStarted, node=node, call_id=call_id, tool=tool.name)
    started = time.perf_counter()
    invocation = ToolInvocation(
        ctx, node, call_id, tool, arguments, None if tool.idempotent else key
    )
    try:
        value = await ctx.invoke_tool(invocation)
    except BaseException as exc:
        # a call cut off (the node's timeout, the run's end) is closed too, failed: else it
        # stays open in the journal, its trace and its span for ever
        ctx.emit(
            ToolCallFinished,
            node=node,
            call_id=call_id,
            tool=tool.name,
            duration_s=time.perf_counter() - started,
            ok=False,
            error=exc.reason if isinstance(exc, ToolError) else why_call_ended(exc),
        )
        raise
    ctx.emit(
        ToolCallFinished,
        node=node,
        call_id=call_id,
        tool=tool.name,
        duration_s=time.perf_counter() - started,
    )
    return value


async def run_tool_node(
    ctx: RunContext, tool: Tool, node: str, inputs: dict[str, Any], attempt: int
) -> Any:
    key = f"{ctx.run_id}:{node}:{attempt}"
    try:
        return await call_tool(ctx, tool, node, f"{node}@{attempt}", inputs, key=key)
    except ToolError as exc:
        raise NodeError(node, str(exc), retryable=not isinstance(exc, ToolArgumentError)) from exc
