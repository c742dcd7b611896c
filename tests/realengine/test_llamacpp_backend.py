"""`LlamaCppBackend` against a real `llama-server`: the wire (streaming with usage, cached
tokens, structured output, tool calls, metrics), the server's quirks, and the slot table's
affinity, pins and KV offload read back from the server's own `cached_tokens`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from realengine_support import StartServers

from treadle.backends.base import (
    BackendError,
    LLMRequest,
    LLMResponse,
    Message,
    SchedulingHints,
    collect_stream,
)
from treadle.backends.openai_compat.llamacpp import LlamaCppBackend
from treadle.testing.llamacpp import MODEL_ALIAS, LlamaServer

pytestmark = pytest.mark.anyio

SYSTEM = "You are an agent that plans, calls tools and reports. " * 12
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the corpus.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]


def backend(server: LlamaServer, **options: object) -> LlamaCppBackend:
    return LlamaCppBackend(
        server.url, MODEL_ALIAS, dialect_options={"tool_call_bias": 10.0, **options}, retries=0
    )


def ask(text: str, program: str | None = None, *, tools: bool = False, **kw: object) -> LLMRequest:
    messages = [Message(role="system", content=SYSTEM), Message(role="user", content=text)]
    return LLMRequest.model_validate(
        {
            "model": "alias",
            "messages": messages,
            "tools": TOOLS if tools else [],
            "max_tokens": 64,
            "temperature": 0.0,
            "hints": SchedulingHints(program_id=program),
            **kw,
        }
    )


def follow_up(request: LLMRequest, answer: LLMResponse, **hints: object) -> LLMRequest:
    """The request's conversation, continued with the answer and each tool's result."""
    messages = [
        *request.messages,
        Message(role="assistant", content=answer.content, tool_calls=answer.tool_calls),
    ]
    messages += [
        Message(role="tool", tool_call_id=c.id, content="result: " + "lorem ipsum " * 30)
        for c in answer.tool_calls
    ]
    return request.model_copy(
        update={"messages": messages, "hints": request.hints.model_copy(update=hints)}
    )


async def slots(server: LlamaServer) -> list[dict[str, object]]:
    async with httpx.AsyncClient() as client:
        data = (await client.get(server.url + "/slots")).json()
    assert isinstance(data, list)
    return data


@pytest.fixture
async def llama(llama_server: LlamaServer) -> AsyncIterator[LlamaCppBackend]:
    async with backend(llama_server) as b:
        yield b


async def test_generate_stream_and_the_prefix_cache(llama: LlamaCppBackend) -> None:
    first = await llama.generate(ask("first question about agents"))
    assert first.usage.prompt_tokens > 300 and first.usage.completion_tokens > 0
    assert first.model == MODEL_ALIAS
    chunks = [c async for c in llama.stream(ask("second question about agents"))]
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage is not None
    folded = await collect_stream(_iter(chunks))
    # the shared system prompt came from the slot's KV, as the server itself reports
    assert folded.usage.cached_prompt_tokens >= len(SYSTEM) // 3
    streamed = await llama.generate(ask("third", stream=True))
    assert streamed.ttft_s is not None and streamed.ttft_s > 0


async def _iter(items: list) -> AsyncIterator:  # type: ignore[type-arg]
    for item in items:
        yield item


async def test_structured_output_parses(llama: LlamaCppBackend) -> None:
    schema = {
        "title": "Plan",
        "type": "object",
        "properties": {"queries": {"type": "array", "items": {"type": "string"}}},
        "required": ["queries"],
    }
    answer = await llama.generate(ask("plan", response_schema=schema, max_tokens=200))
    data = json.loads(answer.content or "")
    assert isinstance(data["queries"], list)


async def test_tool_calls_round_trip_and_reuse_the_conversation(llama: LlamaCppBackend) -> None:
    request = ask("find things", "p1", tools=True, max_tokens=200)
    answer = await llama.generate(request)
    assert answer.finish_reason == "tool_calls"
    assert [c.name for c in answer.tool_calls] == ["search"]
    assert "query" in json.loads(answer.tool_calls[0].arguments)
    again = await llama.generate(follow_up(request, answer))
    # the whole first turn (prompt and answer) was still in the program's slot
    assert again.usage.cached_prompt_tokens >= answer.usage.prompt_tokens


async def test_metrics_come_from_the_server_and_the_slot_table(llama: LlamaCppBackend) -> None:
    await llama.generate(ask("warm the cache"))
    await llama.generate(ask("and hit it"))
    load = await llama.metrics()
    assert load.running == 0 and load.waiting == 0
    assert load.prefix_hits is not None and load.prefix_hits > 0
    assert load.prefix_hit_rate is not None and 0 < load.prefix_hit_rate < 1
    assert load.kv_usage == 0.0  # no slot busy or pinned


async def test_context_overflow_is_a_clear_refusal(llama: LlamaCppBackend) -> None:
    with pytest.raises(BackendError) as info:
        await llama.generate(ask("x " * 20000))
    assert not info.value.retryable and "400" in str(info.value)
    assert "context" in str(info.value)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_tokens", [14, 30])
async def test_a_tool_call_cut_at_max_tokens_is_refused(
    llama: LlamaCppBackend, stream: bool, max_tokens: int
) -> None:
    """llama.cpp ends such an answer with finish_reason "length" and the call's raw markup
    as text, nothing (streamed) or a partial call: never run, never sent back."""
    request = ask("find", "p", tools=True, max_tokens=max_tokens, stream=stream)
    with pytest.raises(BackendError, match="middle of a tool call") as info:
        await llama.generate(request)
    assert not info.value.retryable


async def test_a_pinned_slot_survives_other_programs_while_the_tool_runs(
    start_servers: StartServers,
) -> None:
    """Two slots. `a` finishes a turn with a tool call; while its tool runs, `b` and `c`
    arrive together. Without a pin one of them must take `a`'s slot (the other is busy);
    with a pin `c` waits for `b`'s slot and `a` finds its whole context again."""
    cached: dict[bool, int] = {}
    for pin in (False, True):
        (server,) = start_servers(1, slots=2, context=16384)
        async with backend(server, offload=False) as llama:
            request = ask("a's task " * 40, "a", tools=True, max_tokens=200)
            hints = {"pin_ttl_s": 60.0} if pin else {}
            first = await llama.generate(
                request.model_copy(update={"hints": request.hints.model_copy(update=hints)})
            )
            assert first.tool_calls
            async with anyio.create_task_group() as tg:
                for p in "bc":
                    tg.start_soon(llama.generate, ask(f"{p}'s task " * 80, p, max_tokens=32))
            again = await llama.generate(follow_up(request, first))
            cached[pin] = again.usage.cached_prompt_tokens
            assert llama.stats.pins_set == (1 if pin else 0)
            if pin:
                assert llama.stats.slot_waits >= 1
            server.stop()
    assert cached[True] >= first.usage.prompt_tokens
    assert cached[False] < first.usage.prompt_tokens // 2


async def test_offload_saves_and_restores_a_waiting_programs_kv(
    start_servers: StartServers,
) -> None:
    """One slot. `a` waits on a tool while `b` needs the slot: `a`'s KV is saved to the
    server's slot directory first and restored when `a` comes back."""
    results: dict[bool, tuple[int, int]] = {}
    for offload in (False, True):
        (server,) = start_servers(1, slots=1, context=8192)
        async with backend(server, offload=offload, pinning=False) as llama:
            request = ask("a's task " * 60, "a", tools=True, max_tokens=200)
            first = await llama.generate(request)
            await llama.generate(ask("b's task " * 60, "b", max_tokens=16))
            again = await llama.generate(follow_up(request, first))
            results[offload] = (again.usage.cached_prompt_tokens, llama.stats.restores)
            if offload:
                stats = llama.stats
                assert stats.saves == 1 and stats.restores == 1 and stats.failed_offloads == 0
                assert stats.saved_tokens >= first.usage.prompt_tokens
                assert list(server.slot_dir.iterdir())  # the file is on the server's disk
            server.stop()
    assert results[True][0] >= first.usage.prompt_tokens
    assert results[False][0] < first.usage.prompt_tokens // 2


async def test_an_abandoned_stream_frees_its_slot(llama_server: LlamaServer) -> None:
    """A consumer that stops reading (the planner at `join()`) closes the connection; the
    server stops generating and the slot goes idle long before max_tokens."""
    async with backend(llama_server) as llama:
        request = ask("stream a long answer", max_tokens=20000)
        body = {"ignore_eos": True}
        received = 0
        stream = llama.stream(request, extra_body=body)
        async for chunk in stream:
            received += len(chunk.delta)
            if received > 20:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(200):
            states = await slots(llama_server)
            if not any(s["is_processing"] for s in states):
                break
            await anyio.sleep(0.05)
        assert not any(s["is_processing"] for s in states)
        decoded = max(s["next_token"][0]["n_decoded"] for s in states if "next_token" in s)  # type: ignore[index]
        assert decoded < 20000
        assert llama.table is not None and not any(s.busy for s in llama.table.slots)
