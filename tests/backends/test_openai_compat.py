"""OpenAICompatBackend against a real HTTP server: answers, streams, tool calls, retries,
garbage, timeouts, metrics and health."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fake_openai_server import USAGE, RunningServer
from tenacity import RetryCallState

from treadle.backends.base import (
    BackendError,
    LLMRequest,
    Message,
    SchedulingHints,
    StreamingBackend,
    ToolCall,
    collect_stream,
)
from treadle.backends.openai_compat.backend import (
    OpenAICompatBackend,
    ToolCallAccumulator,
    _TryAgain,
)

pytestmark = pytest.mark.anyio


def _request(**kw: object) -> LLMRequest:
    return LLMRequest.model_validate(
        {"model": "alias", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def _backend(server: RunningServer, scenario: str, **kw: Any) -> OpenAICompatBackend:
    options: dict[str, Any] = {"backoff_s": 0.01, "max_backoff_s": 0.05, **kw}
    return OpenAICompatBackend(server.base(scenario), "served-model", **options)


async def test_generate_parses_answer_usage_and_cached_tokens(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "ok", dialect="openai") as backend:
        response = await backend.generate(_request(max_tokens=64, temperature=0.2))
    assert response.content == "hello there"
    assert response.finish_reason == "stop"
    assert response.usage.prompt_tokens == 12
    assert response.usage.completion_tokens == 5
    assert response.usage.cached_prompt_tokens == 8
    assert response.model == "served-model"
    assert response.replica == fake_server.base("ok")
    assert response.ttft_s is None  # nothing to measure without streaming
    sent = fake_server.state.requests["ok"][-1]
    assert sent["model"] == "served-model"  # the backend's model, not the alias
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["max_completion_tokens"] == 64
    assert sent["temperature"] == 0.2
    assert sent["stream"] is False


async def test_generate_tool_calls(fake_server: RunningServer) -> None:
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    async with _backend(fake_server, "tools") as backend:
        response = await backend.generate(_request(tools=tools))
    assert response.finish_reason == "tool_calls"
    assert response.content is None
    assert response.tool_calls == [
        ToolCall(id="call_a", name="search", arguments='{"q": "x"}'),
        ToolCall(id="call_b", name="calc", arguments='{"expr": "1+1"}'),
    ]
    assert fake_server.state.requests["tools"][-1]["tools"] == tools


async def test_history_with_tool_results_goes_out_in_openai_format(
    fake_server: RunningServer,
) -> None:
    messages = [
        Message(role="user", content="weather?"),
        Message(role="assistant", tool_calls=[ToolCall(id="c1", name="w", arguments="{}")]),
        Message(role="tool", content="sunny", tool_call_id="c1"),
    ]
    async with _backend(fake_server, "ok") as backend:
        await backend.generate(LLMRequest(model="m", messages=messages))
    sent = fake_server.state.requests["ok"][-1]["messages"]
    assert sent[1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    ]
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


async def test_stream_yields_text_then_final_chunk(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "stream") as backend:
        assert isinstance(backend, StreamingBackend)
        chunks = [c async for c in backend.stream(_request())]
    assert [c.delta for c in chunks[:-1]] == ["Hel", "lo", " wor", "ld"]
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.cached_prompt_tokens == 8
    sent = fake_server.state.requests["stream"][-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_generate_with_stream_flag_measures_ttft(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "stream") as backend:
        response = await backend.generate(_request(stream=True))
    assert response.content == "Hello world"
    assert response.usage.prompt_tokens == USAGE["prompt_tokens"]
    assert response.ttft_s is not None and response.ttft_s > 0
    assert response.replica == fake_server.base("stream")


async def test_stream_assembles_split_interleaved_tool_call_deltas(
    fake_server: RunningServer,
) -> None:
    async with _backend(fake_server, "stream_tools") as backend:
        response = await collect_stream(backend.stream(_request()))
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == [
        ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
        ToolCall(id="call_2", name="get_time", arguments='{"tz": "CET"}'),
    ]
    assert json.loads(response.tool_calls[0].arguments) == {"city": "Paris"}


async def test_retries_5xx_then_succeeds(fake_server: RunningServer) -> None:
    scenario = f"flaky-2-{uuid.uuid4().hex[:8]}"
    async with _backend(fake_server, scenario, retries=2) as backend:
        response = await backend.generate(_request())
    assert response.content == "recovered"
    assert len(fake_server.state.requests[scenario]) == 3


async def test_retries_exhausted_is_retryable_error(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "down", retries=1) as backend:
        before = len(fake_server.state.requests["down"])
        with pytest.raises(BackendError) as info:
            await backend.generate(_request())
    assert info.value.retryable is True
    assert info.value.replica == fake_server.base("down")
    assert "503" in str(info.value) and "no capacity" in str(info.value)
    assert len(fake_server.state.requests["down"]) - before == 2


async def test_stream_retries_before_first_byte(fake_server: RunningServer) -> None:
    scenario = f"flaky-1-{uuid.uuid4().hex[:8]}"
    async with _backend(fake_server, scenario, retries=1) as backend:
        # the flaky scenario answers JSON, not SSE, once it recovers: the stream parser
        # must then fail clearly rather than hang or invent an answer
        with pytest.raises(BackendError, match="not Server-Sent Events") as info:
            await collect_stream(backend.stream(_request()))
    assert info.value.retryable is True  # another replica may well answer properly
    assert len(fake_server.state.requests[scenario]) == 2


def test_backoff_grows_is_jittered_capped_and_honours_retry_after() -> None:
    backend = OpenAICompatBackend("http://127.0.0.1:9/v1", "m", backoff_s=0.5, max_backoff_s=4.0)

    def wait(attempt: int, retry_after: float | None = None) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        failure = _TryAgain("answered 503", retry_after=retry_after)
        state.set_exception((type(failure), failure, None))
        return backend._backoff(state)

    for attempt, full in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        delays = [wait(attempt) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)  # equal jitter: half to all of it
        assert len(set(delays)) > 1
    assert wait(1, retry_after=3.0) == 3.0  # the server asked for longer: wait as asked
    assert wait(1, retry_after=60.0) == 4.0  # ... but never past max_backoff_s
    assert wait(3, retry_after=0.0) <= 2.0  # a shorter Retry-After does not cut the backoff


async def test_connection_refused_is_retried_then_retryable(closed_port_url: str) -> None:
    backend = OpenAICompatBackend(closed_port_url, "m", retries=2, backoff_s=0.01)
    try:
        with pytest.raises(BackendError) as info:
            await backend.generate(_request())
    finally:
        await backend.aclose()
    assert info.value.retryable is True
    assert "cannot connect" in str(info.value)
    assert "3 attempts" in str(info.value)


async def test_client_error_is_not_retried(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "refuse", retries=3) as backend:
        before = len(fake_server.state.requests["refuse"])
        with pytest.raises(BackendError) as info:
            await backend.generate(_request())
    assert info.value.retryable is False
    assert "Priority scheduling is not enabled" in str(info.value)
    assert len(fake_server.state.requests["refuse"]) - before == 1


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("garbage", "not JSON"),
        ("no_choices", "no choices"),
        ("bad_tool_json", "invalid JSON arguments for tool call 'search'"),
    ],
)
async def test_garbage_answers_name_the_server(
    fake_server: RunningServer, scenario: str, expected: str
) -> None:
    async with _backend(fake_server, scenario) as backend:
        with pytest.raises(BackendError) as info:
            await backend.generate(_request())
    assert expected in str(info.value)
    assert fake_server.base(scenario) in str(info.value)


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("stream_garbage", "not JSON"),
        ("stream_cut", "ended before the answer finished"),
        ("stream_error", "CUDA out of memory"),
    ],
)
async def test_broken_streams_raise(
    fake_server: RunningServer, scenario: str, expected: str
) -> None:
    async with _backend(fake_server, scenario) as backend:
        with pytest.raises(BackendError) as info:
            await collect_stream(backend.stream(_request()))
    assert expected in str(info.value)
    assert info.value.retryable is True


async def test_hanging_server_times_out(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "hang", timeout_s=0.3, retries=2) as backend:
        before = len(fake_server.state.requests["hang"])
        with pytest.raises(BackendError) as info:
            await backend.generate(_request())
    assert info.value.retryable is True
    assert "no answer within 0.3 s" in str(info.value)
    # a read timeout is not retried here: the caller decides where to go next
    assert len(fake_server.state.requests["hang"]) - before == 1


async def test_headers_hints_and_trace_context_pass_through(fake_server: RunningServer) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    backend = _backend(
        fake_server,
        "ok",
        dialect="vllm",
        dialect_options={"priority_scheduling": True},
        api_key="sk-test",
        headers={"traceparent": "00-stale-stale-00", "x-team": "infra"},
        request_headers=lambda req: {"x-treadle-model": req.model},
    )
    hints = SchedulingHints(priority=3, request_id="req-42", program_id="run-1")
    request = _request(hints=hints, headers={"traceparent": traceparent})
    async with backend:
        await backend.generate(request, extra_headers={"tracestate": "k=v"})
    headers = fake_server.state.headers["ok"][-1]
    body = fake_server.state.requests["ok"][-1]
    assert headers["traceparent"] == traceparent  # the request's own wins over the default
    assert headers["tracestate"] == "k=v"
    assert headers["x-team"] == "infra"
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["x-request-id"].startswith("req-42.")  # the call's id, made unique
    assert headers["x-treadle-model"] == "alias"
    assert body["priority"] == 3
    assert body["vllm_xargs"] == {"treadle_program_id": "run-1", "treadle_is_last_step": 0}


async def test_response_schema_becomes_response_format(fake_server: RunningServer) -> None:
    schema = {"title": "Answer", "type": "object", "properties": {"x": {"type": "integer"}}}
    async with _backend(fake_server, "ok", dialect="sglang") as backend:
        await backend.generate(_request(response_schema=schema))
    assert fake_server.state.requests["ok"][-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Answer", "schema": schema, "strict": True},
    }


async def test_metrics_parse_vllm_text_and_window_the_hit_rate(fake_server: RunningServer) -> None:
    async with OpenAICompatBackend(fake_server.url + "/v1", "m", dialect="vllm") as backend:
        load = await backend.metrics()
        assert load.running == 5
        assert load.waiting == 5
        assert load.kv_usage == pytest.approx(0.4)
        assert load.prefix_hit_rate == pytest.approx(0.4)  # 4000 / 10000 since start
        fake_server.state.metrics_text = fake_server.state.metrics_text.replace(
            'engine="1",model_name="llama-8b"} 4000.0',
            'engine="1",model_name="llama-8b"} 5000.0',
        ).replace(
            'engine="1",model_name="llama-8b"} 1000.0',
            'engine="1",model_name="llama-8b"} 1900.0',
        )
        try:
            load = await backend.metrics()
        finally:
            from fake_openai_server import VLLM_METRICS_TEXT

            fake_server.state.metrics_text = VLLM_METRICS_TEXT
        assert load.prefix_hit_rate == pytest.approx(0.9)  # 900 hits of 1000 new queries
        assert await backend.health() is True


async def test_metrics_sglang_names(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "sglang", dialect="sglang") as backend:
        load = await backend.metrics()
    assert (load.running, load.waiting) == (7, 2)
    assert load.kv_usage == pytest.approx(0.28)
    assert load.prefix_hit_rate == pytest.approx(0.75)


async def test_metrics_errors_are_clear(fake_server: RunningServer) -> None:
    async with _backend(fake_server, "garbage", dialect="vllm") as backend:
        with pytest.raises(BackendError, match="not Prometheus text exposition"):
            await backend.metrics()
    async with _backend(fake_server, "missing", dialect="sglang") as backend:
        with pytest.raises(BackendError, match=r"answered 404.*--enable-metrics"):
            await backend.metrics()
    async with _backend(fake_server, "ok", dialect="openai") as backend:
        with pytest.raises(BackendError, match="exports no load metrics"):
            await backend.metrics()


async def test_health(fake_server: RunningServer, closed_port_url: str) -> None:
    async with _backend(fake_server, "ok") as backend:
        assert await backend.health() is True
    async with _backend(fake_server, "sick") as backend:
        assert await backend.health() is False
    async with OpenAICompatBackend(closed_port_url, "m") as backend:
        assert await backend.health() is False


def test_base_url_forms_and_bad_arguments() -> None:
    backend = OpenAICompatBackend("http://h:8000", "m")
    assert backend.api_base == "http://h:8000/v1"
    assert backend.metrics_url == "http://h:8000/metrics"
    backend = OpenAICompatBackend("http://h:8000/v1/", "m")
    assert backend.root_url == "http://h:8000"
    with pytest.raises(ValueError, match="http"):
        OpenAICompatBackend("h:8000", "m")
    with pytest.raises(ValueError, match="unknown dialect 'tgi'"):
        OpenAICompatBackend("http://h", "m", dialect="tgi")
    with pytest.raises(ValueError, match="no option 'priority_scheduling'"):
        OpenAICompatBackend(
            "http://h", "m", dialect="continuum", dialect_options={"priority_scheduling": True}
        )


def test_tool_call_accumulator_without_indexes() -> None:
    acc = ToolCallAccumulator("srv")
    acc.add(None, id="a", name="f", arguments='{"x":')
    acc.add(None, arguments=" 1}")
    acc.add(None, id="b", name="g", arguments={"y": 2})
    assert acc.calls() == [
        ToolCall(id="a", name="f", arguments='{"x": 1}'),
        ToolCall(id="b", name="g", arguments='{"y": 2}'),
    ]
    empty = ToolCallAccumulator("srv")
    empty.add(0, id="c", name="h")
    assert empty.calls()[0].arguments == "{}"
    nameless = ToolCallAccumulator("srv")
    nameless.add(0, arguments="{}")
    with pytest.raises(BackendError, match="without a function name"):
        nameless.calls()
