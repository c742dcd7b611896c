"""The simulator's server as the official `openai` client sees it, against what vLLM's
OpenAI server does (14.14): `tool_choice` ("none", "auto", "required", a named function)
with or without a script, `logprobs`, and the requests vLLM refuses with 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
from sim_serving import serving

from treadle.backends.scripted import ScriptedToolCall, ScriptRule

pytestmark = pytest.mark.anyio

MODEL = "sim-api"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
SCRIPTED = [
    ScriptRule(
        match="weather",
        tool_calls=[ScriptedToolCall(name="get_weather", arguments={"city": "Oslo", "days": 2})],
    ),
]


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    async with serving(rules=SCRIPTED, model=MODEL) as (http, _):
        url = str(http.base_url).rstrip("/") + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as c:
            yield c


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_required_and_named_tool_choice_force_a_call_without_a_script(
    client: openai.AsyncOpenAI,
) -> None:
    """vLLM constrains the output to a call: "required" to one of the tools (finish
    "tool_calls"), a named function to that one (finish "stop", as OpenAI)."""
    required = await client.chat.completions.create(
        model=MODEL, messages=ask("hello"), tools=[WEATHER, CLOCK], tool_choice="required"
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    named = await client.chat.completions.create(
        model=MODEL,
        messages=ask("hello"),
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    choice = named.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == ""
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), CLOCK["function"]["parameters"])
    # a scripted call to another function does not override the named one
    scripted = await client.chat.completions.create(
        model=MODEL,
        messages=ask("weather in Oslo?"),
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [c.function.name for c in scripted.choices[0].message.tool_calls or []] == ["get_time"]


async def test_no_tool_calls_without_tools_or_with_tool_choice_none(
    client: openai.AsyncOpenAI,
) -> None:
    """A scripted tool call is only answered when the request may call tools."""
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        answer = await client.chat.completions.create(
            model=MODEL, messages=ask("weather in Oslo?"), **extra
        )
        choice = answer.choices[0]
        assert not choice.message.tool_calls and choice.message.content
        assert choice.finish_reason == "stop"
    auto = await client.chat.completions.create(
        model=MODEL, messages=ask("weather in Oslo?"), tools=[WEATHER]
    )
    assert auto.choices[0].finish_reason == "tool_calls"
    assert auto.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]


async def test_logprobs_for_every_content_token_streaming_or_not(
    client: openai.AsyncOpenAI,
) -> None:
    whole = await client.chat.completions.create(
        model=MODEL, messages=ask("say something"), logprobs=True, top_logprobs=3
    )
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    assert whole.usage is not None and len(entries) == whole.usage.completion_tokens - 1  # eot
    for e in entries:
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
    plain = await client.chat.completions.create(model=MODEL, messages=ask("say something"))
    assert plain.choices[0].logprobs is None
    stream = await client.chat.completions.create(
        model=MODEL, messages=ask("say something"), logprobs=True, stream=True
    )
    streamed = [
        e
        async for chunk in stream
        for c in chunk.choices
        if c.logprobs is not None
        for e in c.logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [{"type": "nope"}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": []}, "`tools` must not be an empty array"),
        ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "Invalid value for `tool_choice`"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "does not match any of the specified `tools`",
        ),
        ({"max_tokens": 10_000_000}, "max_tokens=10000000 cannot be greater than"),
        ({"max_completion_tokens": 131_070}, "maximum input length of 2 tokens"),
        ({"top_logprobs": 2}, "when using `top_logprobs`, `logprobs` must be set to true"),
        ({"logprobs": True, "top_logprobs": -2}, "must be a positive value or -1"),
        ({"logprobs": True, "top_logprobs": 21}, "greater than max allowed: 20"),
        ({"stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
    ],
)
async def test_requests_vllm_refuses_are_a_400(
    client: openai.AsyncOpenAI, extra: dict[str, Any], words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=ask("hi"), **extra)
    assert info.value.status_code == 400
    assert words in info.value.message, info.value.message
    body: Any = info.value.body
    assert body["type"] == "BadRequestError" and body["code"] == 400
