"""The call-interceptor chain: order, what an interceptor may change, tool calls, a call an
interceptor answers itself, and the chain's place next to admission and listeners."""

from __future__ import annotations

from typing import Any

import pytest

from treadle import Graph, LLMRequest, LLMResponse, Runtime, ScriptedBackend, ScriptRule, tool
from treadle.backends.base import Capabilities
from treadle.backends.scripted import ScriptedToolCall
from treadle.runtime.core.context import LLMCall, SendLLM, ToolInvocation
from treadle.runtime.core.events import (
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
    ToolCallFinished,
)
from treadle.runtime.core.interceptors import CallInterceptor, ExtraHeaders, InvokeTool

pytestmark = pytest.mark.anyio


class Recording:
    """A backend that keeps every request it gets, then answers as scripted."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner or ScriptedBackend()
        self.requests: list[LLMRequest] = []

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def generate(self, request: LLMRequest) -> LLMResponse:
        self.requests.append(request)
        return await self.inner.generate(request)


class Tagging(CallInterceptor):
    """Records the order calls pass it in, and adds its own header."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        self.seen.append(f"{self.name}>")
        call.request = call.request.model_copy(
            update={"headers": {**call.request.headers, f"x-{self.name}": call.call_id}}
        )
        response = await call_next(call)
        self.seen.append(f"<{self.name}")
        return response

    async def tool_call(self, call: ToolInvocation, call_next: InvokeTool) -> Any:
        self.seen.append(f"{self.name}:{call.tool.name}")
        return await call_next(call)


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    return key.upper()


def one_llm_graph() -> Graph:
    g = Graph("ask", inputs={"q": str})
    g.output(a=g.llm("ask", "Answer {q}", inputs={"q": g.input.q}).out)
    return g


async def test_interceptors_wrap_each_call_in_order() -> None:
    seen: list[str] = []
    backend = Recording()
    runtime = Runtime(
        models={"default": backend},
        interceptors=[Tagging("outer", seen), Tagging("inner", seen)],
    )
    result = await runtime.run(one_llm_graph(), {"q": "x"})
    assert seen == ["outer>", "inner>", "<inner", "<outer"]
    (request,) = backend.requests
    assert request.headers == {"x-outer": "ask#1", "x-inner": "ask#1"}
    kinds = [type(e) for e in result.events if "LLMCall" in type(e).__name__]
    assert kinds == [LLMCallQueued, LLMCallDispatched, LLMCallFinished]


async def test_tool_calls_of_tool_nodes_and_of_models_pass_the_chain() -> None:
    seen: list[str] = []
    backend = ScriptedBackend(
        [
            ScriptRule(
                match="Use", tool_calls=[ScriptedToolCall(name="lookup", arguments={"key": "a"})]
            ),
            ScriptRule(match="", content="done"),
        ]
    )
    g = Graph("tools", inputs={"k": str})
    direct = g.tool("direct", lookup, inputs={"key": g.input.k})
    g.output(
        d=direct.out,
        m=g.llm("agent", "Use {k}", inputs={"k": g.input.k}, tools=[lookup]).out,
    )
    runtime = Runtime(models={"default": backend}, interceptors=[Tagging("t", seen)])
    result = await runtime.run(g, {"k": "b"})
    assert result.output.d == "B"
    assert sorted(s for s in seen if ":" in s) == ["t:lookup", "t:lookup"]
    assert len([e for e in result.events if isinstance(e, ToolCallFinished) and e.ok]) == 2


async def test_extra_headers_do_not_override_a_requests_own() -> None:
    class Own(CallInterceptor):
        async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
            call.request = call.request.model_copy(update={"headers": {"x-team": "own"}})
            return await call_next(call)

    backend = Recording()
    runtime = Runtime(
        models={"default": backend},
        interceptors=[Own(), ExtraHeaders({"x-team": "default", "x-env": "prod"})],
    )
    await runtime.run(one_llm_graph(), {"q": "x"})
    assert backend.requests[0].headers == {"x-team": "own", "x-env": "prod"}


async def test_a_call_answered_by_an_interceptor_is_queued_and_finished_not_dispatched() -> None:
    class Cache(CallInterceptor):
        async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
            return LLMResponse(content="cached")

    backend = Recording()
    runtime = Runtime(models={"default": backend}, interceptors=[Cache()])
    result = await runtime.run(one_llm_graph(), {"q": "x"})
    assert result.output.a == "cached"
    assert backend.requests == []
    kinds = [type(e) for e in result.events if "LLMCall" in type(e).__name__]
    assert kinds == [LLMCallQueued, LLMCallFinished]


async def test_an_interceptor_that_wraps_only_tools_is_not_on_the_llm_path() -> None:
    class ToolsOnly(CallInterceptor):
        async def tool_call(self, call: ToolInvocation, call_next: InvokeTool) -> Any:
            return await call_next(call)

    runtime = Runtime(interceptors=[ToolsOnly()])
    assert runtime.chain.wrap_llm is not None
    send = runtime.chain.wrap_llm(_terminal)
    assert send is _terminal  # nothing wraps LLM calls: the terminal itself


async def _terminal(call: LLMCall) -> LLMResponse:  # pragma: no cover - never awaited
    return LLMResponse(content="")
