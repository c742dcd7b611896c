"""Span names, kinds and attributes as OpenTelemetry's GenAI semantic conventions define
them (14.15): `invoke_workflow {graph}` (INTERNAL), `chat {model}` (CLIENT, the real model,
its provider and server, the request's limits, the response's model and id) and
`execute_tool {tool}` (INTERNAL). Checked over real HTTP against the simulator's server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai
from opentelemetry.semconv.attributes import server_attributes as server_attrs
from opentelemetry.trace import SpanKind
from sim_serving import serving

from treadle import Graph, Runtime, tool
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.scripted import ScriptedToolCall, ScriptRule
from treadle.runtime.observe import tracing
from treadle.runtime.observe.tracing import OtelTracer

pytestmark = pytest.mark.anyio

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@tool
def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city}: sunny"


@asynccontextmanager
async def served_backend() -> AsyncIterator[tuple[OpenAICompatBackend, int]]:
    """An `openai_compat` backend (vLLM's dialect) on a simulated replica over HTTP."""
    rules = [
        ScriptRule(
            match="Weather",
            tool_calls=[ScriptedToolCall(name="lookup", arguments={"city": "Oslo"})],
        )
    ]
    async with serving(rules=rules, model=MODEL) as (client, _):
        url = client.base_url
        backend = OpenAICompatBackend(f"{url.scheme}://{url.host}:{url.port}/v1", MODEL, retries=0)
        try:
            yield backend, int(url.port or 80)
        finally:
            await backend.aclose()


def attr(span: Any, key: str) -> Any:
    return (span.attributes or {}).get(key)


async def test_spans_follow_the_genai_conventions() -> None:
    g = Graph("weather_agent", inputs={"q": str})
    g.output(
        a=g.llm(
            "ask",
            "Weather in {q}?",
            inputs={"q": g.input.q},
            tools=[lookup],
            max_tokens=64,
            temperature=0.2,
        ).out
    )
    tracer, exporter = OtelTracer.in_memory()
    async with served_backend() as (backend, port):
        runtime = Runtime(models={"default": backend}, listeners=[tracer.listener])
        result = await runtime.run(g, {"q": "Oslo"})
        assert result.ok, result.error
    spans = exporter.get_finished_spans()

    (run,) = [s for s in spans if attr(s, genai.GEN_AI_OPERATION_NAME) == "invoke_workflow"]
    assert run.name == "invoke_workflow weather_agent" and run.kind is SpanKind.INTERNAL
    assert attr(run, genai.GEN_AI_WORKFLOW_NAME) == "weather_agent"

    chats = [s for s in spans if attr(s, genai.GEN_AI_OPERATION_NAME) == "chat"]
    assert len(chats) == 2  # the call that asks for the tool, and the answer
    for chat in chats:
        assert chat.name == f"chat {MODEL}" and chat.kind is SpanKind.CLIENT
        assert attr(chat, genai.GEN_AI_REQUEST_MODEL) == MODEL
        assert attr(chat, "treadle.model_alias") == "default"
        assert attr(chat, genai.GEN_AI_PROVIDER_NAME) == "vllm"
        assert attr(chat, server_attrs.SERVER_ADDRESS) == "127.0.0.1"
        assert attr(chat, server_attrs.SERVER_PORT) == port
        assert attr(chat, genai.GEN_AI_REQUEST_MAX_TOKENS) == 64
        assert attr(chat, genai.GEN_AI_REQUEST_TEMPERATURE) == 0.2
        assert attr(chat, genai.GEN_AI_RESPONSE_MODEL) == MODEL
        # the server's id of the completion (vLLM's dialect sends the request id it takes)
        assert ":ask:" in str(attr(chat, genai.GEN_AI_RESPONSE_ID))

    (call,) = [s for s in spans if attr(s, genai.GEN_AI_OPERATION_NAME) == "execute_tool"]
    assert call.name == "execute_tool lookup" and call.kind is SpanKind.INTERNAL


def test_the_names_are_the_installed_conventions() -> None:
    assert tracing.GEN_AI_PROVIDER_NAME == genai.GEN_AI_PROVIDER_NAME
    assert tracing.GEN_AI_RESPONSE_MODEL == genai.GEN_AI_RESPONSE_MODEL
    assert tracing.GEN_AI_RESPONSE_ID == genai.GEN_AI_RESPONSE_ID
    assert tracing.GEN_AI_REQUEST_MAX_TOKENS == genai.GEN_AI_REQUEST_MAX_TOKENS
    assert tracing.GEN_AI_REQUEST_TEMPERATURE == genai.GEN_AI_REQUEST_TEMPERATURE
    assert tracing.SERVER_ADDRESS == server_attrs.SERVER_ADDRESS
    assert tracing.SERVER_PORT == server_attrs.SERVER_PORT
