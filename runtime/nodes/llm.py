"""LLM and tool execution inside a run: the gateway every LLM call goes through, the
tool-calling conversation of an `llm` node (parallel tool calls run at once), and `tool`
nodes.

The gateway is where scheduling hints are attached and where the scheduler (when one is
configured) decides the order of calls across runs.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from pydantic import BaseModel, ValidationError

from treadle.backends.base import (
    Backend,
    BackendError,
    LLMRequest,
    LLMResponse,
    Message,
    SchedulingHints,
    StreamChunk,
    StreamingBackend,
    ToolCall,
    collect_stream,
)
from treadle.graphs.analysis import LLMFacts
from treadle.graphs.spec import LLMNode
from treadle.runtime.core.errors import NodeError, OutputError
from treadle.runtime.core.events import (
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
    LLMTokens,
    ToolCallFinished,
    ToolCallStarted,
)
from treadle.runtime.core.values import as_text
from treadle.tools import Tool, ToolArgumentError, ToolError

if TYPE_CHECKING:
    from treadle.runtime.core.context import RunContext


#: receives an answer's text as it streams; returning True says the caller has all it needs,
#: and the generation is stopped there (the stream is closed, which aborts it on the server)
TextSink = Callable[[str], Awaitable[bool | None]]


class CallAdmission(Protocol):
    """Decides when an LLM call may go to its backend (the scheduler implements this).

    `admit` returns once the call may be sent (`call_id` names it in the run's events), with
    a ticket and the request to send: the same one, or a copy whose hints the scheduler
    filled in (priority, pin TTL).
    `release(ticket, response)` follows every admitted call (response None: it failed or
    was cancelled). `end_run(ctx, status)` comes once the run is over, before its
    `RunFinished` event (status "interrupted": it stopped and may be resumed), so whatever
    the admission still holds for it is released, and said, within the run's events."""

    async def admit(
        self, ctx: RunContext, node: str, call_id: str, request: LLMRequest
    ) -> tuple[Any, LLMRequest]: ...

    def release(self, ticket: Any, response: LLMResponse | None) -> None: ...

    def end_run(self, ctx: RunContext, status: str) -> None: ...


class LLMGateway:
    """Maps model aliases to backends and sends calls, emitting the call events."""

    def __init__(
        self, backends: Mapping[str, Backend], admission: CallAdmission | None = None
    ) -> None:
        self.backends = dict(backends)
        self.admission = admission

    def backend(self, alias: str) -> Backend:
        try:
            return self.backends[alias]
        except KeyError:
            known = ", ".join(sorted(self.backends)) or "none"
            raise NodeError(alias, f"no backend for model {alias!r} (known: {known})") from None

    async def call(
        self,
        ctx: RunContext,
        node: str,
        alias: str,
        request: LLMRequest,
        *,
        on_text: TextSink | None = None,
    ) -> LLMResponse:
        """Send one call through admission, with its events. With `on_text`, the answer's
        text is handed over as it streams (all at once if the backend cannot stream)."""
        backend = self.backend(alias)
        ctx.llm_call_counter += 1
        call_id = f"{node}#{ctx.llm_call_counter}"
        ctx.emit(LLMCallQueued, node=node, call_id=call_id, model=alias)
        queued = time.perf_counter()
        ticket = None
        if self.admission is not None:
            ticket, request = await self.admission.admit(ctx, node, call_id, request)
        ctx.emit(
            LLMCallDispatched,
            node=node,
            call_id=call_id,
            priority=request.hints.priority,
            queue_wait_s=time.perf_counter() - queued,
        )
        headers = ctx.call_headers.pop(call_id, None)
        if headers:
            request = request.model_copy(update={"headers": {**request.headers, **headers}})
        started = time.perf_counter()
        response: LLMResponse | None = None
        try:
            streams = isinstance(backend, StreamingBackend) and backend.capabilities.streaming
            if streams and (on_text is not None or ctx.options.stream_tokens):
                assert isinstance(backend, StreamingBackend)
                response = await self._streamed(ctx, backend, node, call_id, request, on_text)
            else:
                response = await backend.generate(request)
        except BackendError as exc:
            ctx.emit(
                LLMCallFinished,
                node=node,
                call_id=call_id,
                model=alias,
                duration_s=time.perf_counter() - started,
                error=str(exc),
                replica=exc.replica,
            )
            raise NodeError(node, f"model {alias!r}: {exc}", retryable=exc.retryable) from exc
        finally:
            if self.admission is not None:
                self.admission.release(ticket, response)
        usage = response.usage
        ctx.emit(
            LLMCallFinished,
            node=node,
            call_id=call_id,
            model=alias,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens,
            duration_s=time.perf_counter() - started,
            ttft_s=response.ttft_s,
            tool_calls=len(response.tool_calls),
            replica=response.replica,
            finish_reason=response.finish_reason,
        )
        if on_text is not None and not streams and response.content:
            await on_text(response.content)  # the whole answer, once it has arrived
        return response

    async def _streamed(
        self,
        ctx: RunContext,
        backend: StreamingBackend,
        node: str,
        call_id: str,
        request: LLMRequest,
        on_text: TextSink | None,
    ) -> LLMResponse:
        emit_tokens = ctx.options.stream_tokens

        async def chunks() -> AsyncIterator[StreamChunk]:
            stream = backend.stream(request.model_copy(update={"stream": True}))
            async for chunk in stream:
                if chunk.delta:
                    if emit_tokens:
                        ctx.emit(LLMTokens, node=node, call_id=call_id, text=chunk.delta)
                    if on_text is not None and await on_text(chunk.delta):
                        # closing the stream now (not when it is collected) ends the
                        # generation on the server at once
                        aclose = getattr(stream, "aclose", None)
                        if aclose is not None:
                            await aclose()
                        yield chunk.model_copy(update={"finish_reason": "stop"})
                        return
                yield chunk

        return await collect_stream(chunks())


async def run_llm_node(
    ctx: RunContext, spec: LLMNode, facts: LLMFacts | None, node: str, inputs: dict[str, Any]
) -> Any:
    """Run an `llm` node's conversation to its final, parsed answer."""
    text = {k: as_text(v) for k, v in inputs.items()}
    messages: list[Message] = []
    if spec.system:
        messages.append(Message(role="system", content=spec.system.format(**text)))
    messages.append(Message(role="user", content=spec.prompt.format(**text)))
    schema = output_schema(spec.output)
    tools = {t.name: t for t in spec.tools}
    tool_specs = [t.openai_schema() for t in spec.tools]
    # with tools, any turn may call one, so only a tool-less last node is a last step
    last_step = facts is not None and facts.is_last_llm_step and not tools
    next_tool = next(iter(tools), None) or (
        facts.next_tools[0] if facts and facts.next_tools else None
    )
    repaired = False
    for turn in range(1, spec.max_turns + 1):
        request = LLMRequest(
            model=spec.model,
            messages=list(messages),
            tools=tool_specs,
            response_schema=schema,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            hints=SchedulingHints(
                program_id=ctx.run_id,
                request_id=f"{ctx.run_id}:{node}:{turn}",
                tenant=ctx.options.tenant,
                next_tool=next_tool,
                is_last_step=last_step,
            ),
        )
        response = await ctx.gateway.call(ctx, node, spec.model, request)
        if response.tool_calls and tools and turn < spec.max_turns:
            messages.append(
                Message(role="assistant", content=response.content, tool_calls=response.tool_calls)
            )
            results = await run_tool_calls(ctx, node, response.tool_calls, tools)
            messages.extend(
                Message(role="tool", tool_call_id=call.id, name=call.name, content=result)
                for call, result in zip(response.tool_calls, results, strict=True)
            )
            continue
        if response.tool_calls and not response.content:
            raise NodeError(
                node,
                f"model still asked for tools after {spec.max_turns} turns (max_turns)",
            )
        try:
            return parse_output(spec.output, response.content, node)
        except OutputError as exc:
            if repaired or turn >= spec.max_turns:
                raise
            repaired = True
            messages.append(Message(role="assistant", content=response.content))
            messages.append(
                Message(
                    role="user",
                    content=f"That answer was invalid ({exc.reason}). Answer again with "
                    "only a JSON object that matches the schema.",
                )
            )
    raise NodeError(node, "no answer within max_turns")


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
    try:
        value = await tool.invoke(arguments, idempotency_key=None if tool.idempotent else key)
    except ToolError as exc:
        ctx.emit(
            ToolCallFinished,
            node=node,
            call_id=call_id,
            tool=tool.name,
            duration_s=time.perf_counter() - started,
            ok=False,
            error=exc.reason,
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


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_output(output: Any, content: str | None, node: str) -> Any:
    """The model's answer as the node's declared output type."""
    if output is str or output is Any:
        return content or ""
    text = content or ""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        if isinstance(output, type) and issubclass(output, BaseModel):
            return output.model_validate_json(text)
        return json.loads(text)
    except (ValidationError, ValueError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise OutputError(
            node, f"answer does not match {getattr(output, '__name__', output)}: {detail}"
        ) from None


def output_schema(output: Any) -> dict[str, Any] | None:
    """The JSON Schema of a pydantic output type (None for other types), built once per
    model: pydantic builds it anew on every call, and every LLM call of a node sends it."""
    if isinstance(output, type) and issubclass(output, BaseModel):
        return _model_schema(output)
    return None


@functools.lru_cache(maxsize=256)
def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()
