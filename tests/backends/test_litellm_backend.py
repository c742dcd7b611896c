"""LiteLLMBackend with `litellm.acompletion` replaced: real litellm response objects, no network.

Skipped where litellm is not installed (it is the optional `remote` extra), except the
checks that need no litellm at all.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from treadle.backends.base import BackendError, LLMRequest, Message, ToolCall, collect_stream
from treadle.backends.litellm import INSTALL_HINT, LiteLLMBackend

pytestmark = [
    pytest.mark.anyio,
    # litellm's own types trip a pydantic warning on import; not ours to fix
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning"),
]

HAS_LITELLM = importlib.util.find_spec("litellm") is not None
needs_litellm = pytest.mark.skipif(
    not HAS_LITELLM, reason="litellm (treadle[remote]) not installed"
)


def _request(**kw: Any) -> LLMRequest:
    return LLMRequest(model="alias", messages=[Message(role="user", content="hi")], **kw)


class FakeAcompletion:
    """Stands in for `litellm.acompletion`: records the call, returns what it is given."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if isinstance(self.result, Exception):
            raise self.result
        if kwargs.get("stream"):
            chunks = self.result

            async def gen() -> AsyncIterator[Any]:
                for chunk in chunks:
                    yield chunk

            return gen()
        return self.result


def test_module_import_does_not_import_litellm() -> None:
    code = (
        "import sys, treadle.backends.litellm, treadle.backends.factory;"
        "assert 'litellm' not in sys.modules, 'litellm imported eagerly'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_litellm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "litellm" else real(name, *a)
    )
    with pytest.raises(ImportError) as info:
        LiteLLMBackend("openai/gpt-4o-mini")
    assert "pip install 'treadle[remote]'" in str(info.value)
    assert "treadle[remote]" in INSTALL_HINT


@needs_litellm
async def test_generate_maps_request_and_parses_model_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import litellm
    from litellm import ModelResponse

    response = ModelResponse(
        model="gpt-4o-mini-2024",
        choices=[
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "search", "arguments": '{"q": "kv"}'},
                        }
                    ],
                },
            }
        ],
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "total_tokens": 107,
            "prompt_tokens_details": {"cached_tokens": 64},
        },
    )
    fake = FakeAcompletion(response)
    monkeypatch.setattr(litellm, "acompletion", fake)
    schema = {"title": "Out", "type": "object"}
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    backend = LiteLLMBackend("openai/gpt-4o-mini", num_retries=3, api_base="http://gw")
    result = await backend.generate(
        _request(
            tools=tools,
            max_tokens=50,
            temperature=0.0,
            response_schema=schema,
            headers={"traceparent": "00-abc-def-01"},
        ),
        extra_headers={"x-extra": "1"},
    )
    assert result.tool_calls == [ToolCall(id="call_1", name="search", arguments='{"q": "kv"}')]
    assert result.finish_reason == "tool_calls"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (100, 7)
    assert result.usage.cached_prompt_tokens == 64
    assert result.model == "gpt-4o-mini-2024"
    call = fake.calls[0]
    assert call["model"] == "openai/gpt-4o-mini"
    assert call["messages"] == [{"role": "user", "content": "hi"}]
    assert call["tools"] == tools
    assert (call["max_tokens"], call["temperature"]) == (50, 0.0)
    assert call["response_format"]["json_schema"] == {"name": "Out", "schema": schema}
    assert call["num_retries"] == 3 and call["api_base"] == "http://gw"
    assert call["extra_headers"] == {"traceparent": "00-abc-def-01", "x-extra": "1"}
    assert call["stream"] is False


@needs_litellm
async def test_anthropic_style_cache_reads_count_as_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    import litellm
    from litellm import ModelResponse
    from litellm.types.utils import Usage as LiteUsage

    response = ModelResponse(
        model="claude",
        choices=[
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        usage=LiteUsage(
            prompt_tokens=50, completion_tokens=2, total_tokens=52, cache_read_input_tokens=40
        ),
    )
    monkeypatch.setattr(litellm, "acompletion", FakeAcompletion(response))
    result = await LiteLLMBackend("anthropic/claude-x").generate(_request())
    assert result.content == "ok"
    assert result.usage.cached_prompt_tokens == 40


@needs_litellm
async def test_stream_assembles_tool_calls_from_real_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import litellm
    from litellm.types.utils import ModelResponseStream

    def chunk(delta: dict[str, Any], finish: str | None = None) -> Any:
        choices: list[Any] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return ModelResponseStream(model="m", choices=choices)

    chunks = [
        chunk({"role": "assistant", "content": "Let me "}),
        chunk({"content": "check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"ci'},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
        chunk({}, "tool_calls"),
        ModelResponseStream(
            model="m",
            choices=[],
            usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        ),
    ]
    fake = FakeAcompletion(chunks)
    monkeypatch.setattr(litellm, "acompletion", fake)
    backend = LiteLLMBackend("openai/gpt-4o-mini")
    pieces = [c async for c in backend.stream(_request())]
    assert [p.delta for p in pieces[:-1]] == ["Let me ", "check."]
    folded = await collect_stream(_aiter(pieces))
    assert folded.content == "Let me check."
    assert folded.tool_calls == [
        ToolCall(id="c1", name="get_weather", arguments='{"city": "Oslo"}')
    ]
    assert folded.finish_reason == "tool_calls"
    assert folded.usage.prompt_tokens == 9
    assert fake.calls[0]["stream_options"] == {"include_usage": True}
    # the non-stream path with request.stream folds the same and measures TTFT
    fake.calls.clear()
    response = await backend.generate(_request(stream=True))
    assert response.content == "Let me check." and response.ttft_s is not None


@needs_litellm
async def test_litellm_mock_response_round_trip() -> None:
    """Through litellm's real acompletion (its built-in `mock_response`, no network)."""
    backend = LiteLLMBackend("openai/gpt-4o-mini", mock_response="hello from litellm")
    response = await backend.generate(_request())
    assert response.content == "hello from litellm"
    streamed = await collect_stream(backend.stream(_request()))
    assert streamed.content == "hello from litellm"


@needs_litellm
@pytest.mark.parametrize(
    ("make", "retryable"),
    [
        (lambda lt: lt.RateLimitError("slow down", llm_provider="openai", model="m"), True),
        (lambda lt: lt.APIConnectionError("refused", llm_provider="openai", model="m"), True),
        (lambda lt: lt.AuthenticationError("bad key", llm_provider="openai", model="m"), False),
        (lambda lt: lt.BadRequestError("bad", model="m", llm_provider="openai"), False),
    ],
)
async def test_errors_map_to_backend_error(
    monkeypatch: pytest.MonkeyPatch, make: Any, retryable: bool
) -> None:
    import litellm

    monkeypatch.setattr(litellm, "acompletion", FakeAcompletion(make(litellm)))
    backend = LiteLLMBackend("openai/gpt-4o-mini")
    with pytest.raises(BackendError) as info:
        await backend.generate(_request())
    assert info.value.retryable is retryable
    assert info.value.replica == "litellm:openai/gpt-4o-mini"


@needs_litellm
async def test_invalid_tool_arguments_are_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import litellm
    from litellm import ModelResponse

    response = ModelResponse(
        model="m",
        choices=[
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{bad"},
                        }
                    ],
                },
            }
        ],
    )
    monkeypatch.setattr(litellm, "acompletion", FakeAcompletion(response))
    with pytest.raises(BackendError, match="invalid JSON arguments for tool call 'f'"):
        await LiteLLMBackend("openai/x").generate(_request())


@needs_litellm
async def test_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import litellm
    from litellm import ModelResponse

    fake = FakeAcompletion(
        ModelResponse(
            model="m", choices=[{"index": 0, "message": {"role": "assistant", "content": "x"}}]
        )
    )
    monkeypatch.setattr(litellm, "acompletion", fake)
    backend = LiteLLMBackend("openai/x", api_key_env="TREADLE_TEST_KEY")
    monkeypatch.delenv("TREADLE_TEST_KEY", raising=False)
    with pytest.raises(BackendError, match="TREADLE_TEST_KEY is not set"):
        await backend.generate(_request())
    monkeypatch.setenv("TREADLE_TEST_KEY", "sk-1")
    await backend.generate(_request())
    assert fake.calls[-1]["api_key"] == "sk-1"


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item
