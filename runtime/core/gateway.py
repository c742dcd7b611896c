"""The LLM gateway: the one way out for a run's LLM calls.

Nodes (`llm`, `planner`) call `call_llm(ctx, ...)`; the gateway maps the model alias to
its backend, numbers the call, emits its events, and sends it through the run's
interceptor chain (admission, tracing headers, extra headers, metrics:
`treadle.runtime.core.interceptors`, composed by the `Runtime` as `ctx.send_llm`) to
`dispatch`, the chain's end, which hands it to the backend, streaming when someone wants
the text as it arrives.

Streamed text becomes `LLMTokens` events (with `RunOptions.stream_tokens`), batched: the
first piece of an answer goes out at once (it marks the time to first token), later pieces
are joined and go out at most `TOKEN_BATCH_S` after the previous event, so a fast stream
makes a few events a second per call rather than one per token, and none waits longer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from treadle.backends.base import (
    Backend,
    BackendError,
    LLMRequest,
    LLMResponse,
    StreamChunk,
    StreamingBackend,
    Usage,
    collect_stream,
    target_of,
)
from treadle.backends.tokens import CHARS, estimate_prompt_tokens
from treadle.runtime.core.context import LLMCall, RunContext, TextSink
from treadle.runtime.core.errors import NodeError, why_call_ended
from treadle.runtime.core.events import (
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
    LLMTokens,
)

__all__ = ["TOKEN_BATCH_S", "backend_for", "call_llm", "dispatch"]

#: streamed text waits at most this long (s) before it is emitted as an `LLMTokens` event
TOKEN_BATCH_S = 0.05


def backend_for(ctx: RunContext, alias: str) -> Backend:
    try:
        return ctx.backends[alias]
    except KeyError:
        known = ", ".join(sorted(ctx.backends)) or "none"
        raise NodeError(alias, f"no backend for model {alias!r} (known: {known})") from None


async def call_llm(
    ctx: RunContext,
    node: str,
    alias: str,
    request: LLMRequest,
    *,
    on_text: TextSink | None = None,
) -> LLMResponse:
    """Send one call through the chain, with its events. With `on_text`, the answer's
    text is handed over as it streams (all at once if the backend cannot stream)."""
    backend = backend_for(ctx, alias)
    ctx.llm_call_counter += 1
    call_id = f"{node}#{ctx.llm_call_counter}"
    target = target_of(backend)
    ctx.emit(
        LLMCallQueued,
        node=node,
        call_id=call_id,
        model=alias,
        request_model=target.model,
        provider=target.provider,
        server_address=target.server_address,
        server_port=target.server_port,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
    )
    call = LLMCall(
        ctx, node, call_id, alias, backend, request, on_text, queued_at=time.perf_counter()
    )
    try:
        response = await ctx.send_llm(call)
    except BaseException as exc:
        # a call cut off (the node's timeout, the run's end) is closed too, failed
        failure = exc if isinstance(exc, BackendError) else None
        ctx.emit(
            LLMCallFinished,
            node=node,
            call_id=call_id,
            model=alias,
            duration_s=time.perf_counter() - (call.sent_at or call.queued_at),
            error=str(exc) if failure is not None else why_call_ended(exc),
            replica=failure.replica if failure is not None else None,
        )
        if failure is not None:
            raise NodeError(node, f"model {alias!r}: {exc}", retryable=failure.retryable) from exc
        raise
    usage = response.usage
    ctx.emit(
        LLMCallFinished,
        node=node,
        call_id=call_id,
        model=alias,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        duration_s=time.perf_counter() - (call.sent_at or call.queued_at),
        ttft_s=response.ttft_s,
        tool_calls=len(response.tool_calls),
        replica=response.replica,
        finish_reason=response.finish_reason,
        response_model=response.model,
        response_id=response.id,
    )
    if on_text is not None and not call.streamed and response.content:
        await on_text(response.content)  # the whole answer, once it has arrived
    return response


async def dispatch(call: LLMCall) -> LLMResponse:
    """The chain's end: the call leaves for its backend."""
    ctx = call.ctx
    ctx.emit(
        LLMCallDispatched,
        node=call.node,
        call_id=call.call_id,
        priority=call.request.hints.priority,
        queue_wait_s=time.perf_counter() - call.queued_at,
    )
    call.sent_at = time.perf_counter()
    backend = call.backend
    if (
        # the cheap test first: an isinstance check against a Protocol costs microseconds
        (call.on_text is not None or ctx.options.stream_tokens)
        and isinstance(backend, StreamingBackend)
        and backend.capabilities.streaming
    ):
        call.streamed = True
        return await _streamed(call, backend)
    return await backend.generate(call.request)


async def _streamed(call: LLMCall, backend: StreamingBackend) -> LLMResponse:
    ctx, on_text = call.ctx, call.on_text
    tokens = _TokenBatch(call) if ctx.options.stream_tokens else None

    async def chunks() -> AsyncIterator[StreamChunk]:
        stream = backend.stream(call.request.model_copy(update={"stream": True}))
        async for chunk in stream:
            if chunk.delta:
                if tokens is not None:
                    tokens.add(chunk.delta)
                if on_text is not None and await on_text(chunk.delta):
                    # closing the stream now (not when it is collected) ends the
                    # generation on the server at once
                    aclose = getattr(stream, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    yield chunk.model_copy(update={"finish_reason": "stop"})
                    return
            yield chunk

    if tokens is None:
        response = await collect_stream(chunks())
    else:
        try:
            response = await collect_stream(chunks())
        finally:
            tokens.close()  # what is left, before the call's end (or its error) is emitted
    if response.usage.total_tokens == 0:
        # no usage arrived: the stream was closed before its last chunk (a planner stops
        # reading at join()), or the server does not report it. Count what was sent and
        # what was received, so run totals, spans and token quotas do not miss the call.
        response.usage = Usage(
            prompt_tokens=estimate_prompt_tokens(call.request),
            completion_tokens=CHARS.count(response.content or ""),
        )
    return response


class _TokenBatch:
    """Joins a call's streamed pieces into `LLMTokens` events (module docstring): `add`
    emits at once when the last event is `TOKEN_BATCH_S` old, else keeps the text and sets
    a timer that emits it when that time is up. A timer on the loop, not a task: a task
    group per call, cancelled at its end, cost about 0.1 ms of CPU per call (the cancel
    formats the task's repr)."""

    __slots__ = ("_call", "_last", "_parts", "_timer")

    def __init__(self, call: LLMCall) -> None:
        self._call = call
        self._parts: list[str] = []
        self._last = -TOKEN_BATCH_S  # the first piece goes out at once
        self._timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        self._parts.append(text)
        wait = self._last + TOKEN_BATCH_S - time.perf_counter()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._parts:
            call = self._call
            text, self._parts = "".join(self._parts), []
            call.ctx.emit(LLMTokens, node=call.node, call_id=call.call_id, text=text)
            self._last = time.perf_counter()

    def close(self) -> None:
        """Emit what is left and stop the timer (the call has ended)."""
        self.flush()
