"""The call-interceptor chain: what every LLM call and tool call of a run passes through on
its way out.

An interceptor wraps one call: it receives the call and `call_next` (the rest of the
chain), may change the call (another request, more headers), wait (admission), measure or
answer it itself (a cache), and returns the result. As with Temporal's interceptors and
httpx's transports, each concern is one small object and the order is explicit:

    Runtime(interceptors=[ExtraHeaders({"x-team": "search"}), metrics.calls_in_flight()],
            admission=SchedulerAdmission(...),
            listeners=[tracer.listener])

    call → ExtraHeaders → CallsInFlight → tracing → admission → backend
           (the given interceptors, then listeners that are also interceptors, such as the
            OpenTelemetry tracer's, then the admission: nearest to the backend, so that a
            call waits for its slot as late as possible and holds it only while it runs)

The run's events stay where they were: the gateway (`treadle.runtime.core.gateway`) emits
`LLMCallQueued` before the chain, `LLMCallDispatched` when the call leaves the chain for
its backend, and `LLMCallFinished` after; `call_tool` (`treadle.runtime.nodes.tool`) emits
`ToolCallStarted` / `ToolCallFinished` around the chain. A call an interceptor answers
itself is queued and finished but never dispatched.

`CallInterceptor`'s methods pass calls on unchanged; an interceptor overrides the ones it
wraps, and a chain skips interceptors for the calls they do not wrap, so an empty chain
costs nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from treadle.backends.base import LLMRequest, LLMResponse, Usage
from treadle.runtime.core.cache import ResultCache
from treadle.runtime.core.context import (
    InvokeTool,
    LLMCall,
    RunContext,
    SendLLM,
    ToolInvocation,
)
from treadle.runtime.core.events import CacheHit

__all__ = [
    "Admission",
    "CallAdmission",
    "CallChain",
    "CallInterceptor",
    "ExtraHeaders",
    "InvokeTool",
    "LLMCall",
    "LLMCallCache",
    "SendLLM",
    "ToolInvocation",
    "invoke_tool",
    "with_headers",
]


class CallInterceptor:
    """Wraps calls; override `llm_call`, `tool_call` or both (see the module docstring)."""

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        return await call_next(call)

    async def tool_call(self, call: ToolInvocation, call_next: InvokeTool) -> Any:
        return await call_next(call)


class CallChain:
    """Interceptors in order (the first is outermost), composed around a terminal."""

    def __init__(self, interceptors: Sequence[CallInterceptor] = ()) -> None:
        self.interceptors = tuple(interceptors)

    def wrap_llm(self, send: SendLLM) -> SendLLM:
        return _fold([i.llm_call for i in self._overriding("llm_call")], send)

    def wrap_tool(self, invoke: InvokeTool) -> InvokeTool:
        return _fold([i.tool_call for i in self._overriding("tool_call")], invoke)

    def _overriding(self, method: str) -> list[CallInterceptor]:
        base = getattr(CallInterceptor, method)
        return [i for i in self.interceptors if getattr(type(i), method) is not base]


def _fold(handlers: Sequence[Callable[..., Any]], terminal: Callable[..., Any]) -> Any:
    call_next = terminal
    for handler in reversed(handlers):
        call_next = functools.partial(handler, call_next=call_next)
    return call_next


async def invoke_tool(call: ToolInvocation) -> Any:
    """The tool chain's terminal: the tool itself."""
    return await call.tool.invoke(call.arguments, idempotency_key=call.idempotency_key)


# -- interceptors every runtime can use -----------------------------------------------------


class CallAdmission(Protocol):
    """Decides when an LLM call may go to its backend (the scheduler implements this:
    `treadle.runtime.sched.admission.SchedulerAdmission`).

    `admit` returns once the call may be sent (`call_id` names it in the run's events), with
    a ticket and the request to send: the same one, or a copy whose hints the scheduler
    filled in (priority, pin TTL).
    `release(ticket, response)` follows every admitted call (response None: it failed or
    was cancelled). `end_run(ctx, status)` comes once the run is over, before its
    `RunFinished` event (status "interrupted": it stopped and may be resumed; "waiting": it
    parked until a person answers, and its next call after that starts it anew), so
    whatever the admission still holds for it is released, and said, within the run's
    events."""

    async def admit(
        self, ctx: RunContext, node: str, call_id: str, request: LLMRequest
    ) -> tuple[Any, LLMRequest]: ...

    def release(self, ticket: Any, response: LLMResponse | None) -> None: ...

    def end_run(self, ctx: RunContext, status: str) -> None: ...

    def end_node(self, ctx: RunContext, node: str, reason: str) -> None:
        """Node instance `node` and those under it were cancelled while the run goes on
        (a race's losers): release what the admission holds for them."""


class Admission(CallInterceptor):
    """A `CallAdmission` as an interceptor: the call waits until it is admitted, goes on with
    the request the admission made of it, and is released when it returns or fails."""

    def __init__(self, admission: CallAdmission) -> None:
        self.admission = admission

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        ticket, call.request = await self.admission.admit(
            call.ctx, call.node, call.call_id, call.request
        )
        response: LLMResponse | None = None
        try:
            response = await call_next(call)
            return response
        finally:
            self.admission.release(ticket, response)


class ExtraHeaders(CallInterceptor):
    """Adds HTTP headers to every LLM request (a request's own headers win)."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.headers = dict(headers)

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        call.request = with_headers(call.request, self.headers, override=False)
        return await call_next(call)


class LLMCallCache(CallInterceptor):
    """Answers an LLM call from a result cache (`ResultCache`: any of treadle's stores)
    when the same request — model alias, messages, tools, output schema, sampling — got an
    answer within `ttl_s`, for the same tenant. A cached answer costs no tokens: the call's
    `LLMCallFinished` reports none, and a `CacheHit` event (with the call's id) the tokens
    it saved. Put it first in the chain, so a cached call waits for no admission.

    The node `cache` option caches whole nodes; this caches single calls (a planner's, a
    tool-calling conversation's turns) — for models whose answer the request determines
    (temperature 0, or answers that may be reused)."""

    def __init__(self, cache: ResultCache, *, ttl_s: float | None = None) -> None:
        self.cache = cache
        self.ttl_s = ttl_s

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        key = llm_call_key(call.ctx.options.tenant, call.alias, call.request)
        try:
            data = await self.cache.cache_get(key)
        except Exception as exc:  # a cache that cannot be read is no reason to fail
            _log.warning("LLM call cache: reading failed, calling the model: %s", exc)
            data = None
        if data is not None:
            cached = LLMResponse.model_validate_json(data)
            saved = cached.usage.total_tokens
            call.ctx.emit(CacheHit, node=call.node, key=key, call_id=call.call_id,
                          saved_tokens=saved)  # fmt: skip
            return cached.model_copy(update={"usage": Usage(), "replica": None, "ttft_s": None})
        response = await call_next(call)
        try:
            await self.cache.cache_put(key, response.model_dump_json().encode(), self.ttl_s)
        except Exception as exc:
            _log.warning("LLM call cache: writing failed: %s", exc)
        return response


def llm_call_key(tenant: str | None, alias: str, request: LLMRequest) -> str:
    """The cache key of an LLM request: what determines its answer, not its ids or
    scheduling hints."""
    what = request.model_dump_json(
        include={"messages", "tools", "response_schema", "max_tokens", "temperature"}
    )
    raw = "\x00".join(("llm-call:1", tenant or "", alias, what))
    return hashlib.sha256(raw.encode()).hexdigest()


_log = logging.getLogger(__name__)


def with_headers(
    request: LLMRequest, headers: Mapping[str, str], *, override: bool = True
) -> LLMRequest:
    """`request` with `headers` added (replacing its own with the same name when `override`)."""
    if not headers:
        return request
    merged = {**request.headers, **headers} if override else {**headers, **request.headers}
    return request.model_copy(update={"headers": merged})
