"""OpenAICompatBackend(dialect="sim") against treadle's simulator server on a real port.

The simulator runs in real time (sped up); these tests check that the sim dialect's fields
reach the engine (pins set and released), that streaming and tool calls survive the wire,
that the prefix cache shows up in `usage`, and that `metrics()` reads the server's text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from fake_openai_server import serve_in_thread

from treadle.backends.base import (
    BackendError,
    LLMRequest,
    Message,
    SchedulingHints,
    collect_stream,
)
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.scripted import ScriptedToolCall, ScriptRule

server_module = pytest.importorskip("treadle.backends.sim.server")

pytestmark = pytest.mark.anyio

# Long enough to fill several 16-token KV blocks, so a repeat hits the prefix cache.
SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the tool you used." for i in range(12))


@dataclass
class SimServer:
    url: str
    model: str


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimServer]:
    rules = [
        ScriptRule(
            match="weather",
            tool_calls=[ScriptedToolCall(name="get_weather", arguments={"city": "Oslo"})],
        ),
        ScriptRule(match="hello", content="Hello from the simulated engine, friend."),
    ]
    (replica,) = server_module.build_replicas(1, policy="priority", rules=rules, speed=20.0)
    with serve_in_thread(server_module.create_app(replica)) as url:
        yield SimServer(url=url, model=replica.model)


@pytest.fixture
async def backend(sim_server: SimServer) -> AsyncIterator[OpenAICompatBackend]:
    async with OpenAICompatBackend(
        sim_server.url + "/v1", sim_server.model, dialect="sim", retries=0, timeout_s=30
    ) as b:
        yield b


def _request(text: str, **kw: object) -> LLMRequest:
    messages = [Message(role="system", content=SYSTEM), Message(role="user", content=text)]
    return LLMRequest.model_validate({"model": "alias", "messages": messages, **kw})


async def test_generate_and_prefix_cache(backend: OpenAICompatBackend) -> None:
    first = await backend.generate(_request("hello there, first"))
    assert first.content == "Hello from the simulated engine, friend."
    assert first.finish_reason == "stop"
    assert first.usage.prompt_tokens > 64
    assert first.usage.completion_tokens > 0
    second = await backend.generate(_request("hello there, second"))
    # the shared system prompt is served from the prefix cache the second time
    assert second.usage.cached_prompt_tokens >= 48


async def test_streaming_text_usage_and_ttft(backend: OpenAICompatBackend) -> None:
    chunks = [c async for c in backend.stream(_request("hello, streaming"))]
    assert len(chunks) > 2  # text arrives in pieces
    assert "".join(c.delta for c in chunks) == "Hello from the simulated engine, friend."
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    response = await backend.generate(_request("hello again, streaming", stream=True))
    assert response.content == "Hello from the simulated engine, friend."
    assert response.ttft_s is not None and response.ttft_s > 0


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


async def test_tool_calls_whole_and_streamed(backend: OpenAICompatBackend) -> None:
    response = await backend.generate(_request("what is the weather?", tools=[WEATHER_TOOL]))
    assert response.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in response.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    streamed = await collect_stream(
        backend.stream(_request("the weather, streamed?", tools=[WEATHER_TOOL]))
    )
    # named: the call the request forces (and sent on the wire, as OpenAI's `tool_choice`)
    forced = {"type": "function", "function": {"name": "get_weather"}}
    named = await backend.generate(_request("hello", tools=[WEATHER_TOOL], tool_choice=forced))
    assert [c.name for c in named.tool_calls] == ["get_weather"]
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}')
    ]


async def test_pin_hints_reach_the_engine(backend: OpenAICompatBackend) -> None:
    before = (await backend.metrics()).raw
    hints = SchedulingHints(priority=-1, program_id="prog-e2e", pin_ttl_s=30.0, request_id="r-1")
    await backend.generate(_request("hello, pin me", hints=hints))
    after = (await backend.metrics()).raw
    assert after["treadle_sim_pins_set_total"] == before.get("treadle_sim_pins_set_total", 0) + 1
    assert after["treadle_sim_pins_active"] >= 1
    last = SchedulingHints(program_id="prog-e2e", is_last_step=True)
    await backend.generate(_request("hello, last step", hints=last))
    final = (await backend.metrics()).raw
    # the last step releases the program's pin and sets none
    assert final["treadle_sim_pins_active"] == after["treadle_sim_pins_active"] - 1
    assert final["treadle_sim_pins_set_total"] == after["treadle_sim_pins_set_total"]


async def test_metrics_and_health(backend: OpenAICompatBackend) -> None:
    await backend.generate(_request("hello, metrics"))
    load = await backend.metrics()
    assert load.running >= 0 and load.waiting >= 0
    assert load.kv_usage is not None and 0.0 <= load.kv_usage <= 1.0
    assert load.prefix_queries is not None and load.prefix_queries > 0
    assert load.prefix_hit_rate is not None and 0.0 <= load.prefix_hit_rate <= 1.0
    assert await backend.health() is True


async def test_wrong_model_is_a_clear_error(sim_server: SimServer) -> None:
    async with OpenAICompatBackend(sim_server.url, "no-such-model", dialect="sim") as other:
        with pytest.raises(BackendError) as info:
            await other.generate(_request("hello"))
    assert info.value.retryable is False
    assert "404" in str(info.value) and "no-such-model" in str(info.value)


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SimServer]:
    """Real time, with a long answer: a request stays in flight for seconds."""
    rules = [ScriptRule(match="essay", content="A long essay follows. " * 150)]
    (replica,) = server_module.build_replicas(1, rules=rules, speed=1.0)
    with serve_in_thread(server_module.create_app(replica)) as url:
        yield SimServer(url=url, model=replica.model)


async def test_a_call_tried_again_while_its_first_try_runs_is_served(
    slow_server: SimServer,
) -> None:
    """The server refuses a request id that is still in flight (as SGLang does), and a
    retried call (a node's next attempt, a run resumed elsewhere) keeps its logical id: the
    backend makes each send's id unique, so both tries are served."""
    body = {
        "model": slow_server.model,
        "messages": [{"role": "user", "content": "an essay, raw"}],
        "rid": "dup-1",
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=slow_server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as running,
    ):
        assert running.status_code == 200
        dup = await client.post("/v1/chat/completions", json={**body, "stream": False})
    assert dup.status_code == 400
    assert "duplicate request id 'dup-1'" in dup.text and '"rid"' in dup.text
    # through the backend: the same call sent while its first try still streams
    async with OpenAICompatBackend(
        slow_server.url + "/v1", slow_server.model, dialect="sglang", retries=0
    ) as backend:
        hints = SchedulingHints(request_id="run-9:fix:1")
        request = _request("an essay, please", hints=hints, max_tokens=8)
        chunks = backend.stream(request.model_copy(update={"max_tokens": None}))
        await anext(chunks)  # the first try is running on the server
        again = await backend.generate(request)
        assert (again.content or "").startswith("A long essay follows.")
        assert again.finish_reason == "length"  # served, cut at its 8 tokens
        await chunks.aclose()
