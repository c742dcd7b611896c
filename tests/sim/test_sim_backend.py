"""`SimBackend`: the simulator as an in-process treadle backend, in real time."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from treadle.backends.base import (
    Backend,
    BackendError,
    LLMRequest,
    Message,
    SchedulingHints,
    StreamingBackend,
    collect_stream,
)
from treadle.backends.scripted import ScriptedToolCall, ScriptRule
from treadle.backends.sim.backend import SimBackend
from treadle.backends.sim.engine import EngineConfig

pytestmark = pytest.mark.anyio


class Verdict(BaseModel):
    label: str
    score: float


def request(text: str, **kw: object) -> LLMRequest:
    return LLMRequest(model="sim", messages=[Message(role="user", content=text)], **kw)


async def test_generate_structured_output_with_engine_timing() -> None:
    backend = SimBackend.create(speed=50.0)
    assert isinstance(backend, Backend) and isinstance(backend, StreamingBackend)
    caps = backend.capabilities
    assert caps.prefix_cache and caps.pin_ttl and caps.priority and caps.program_id
    req = request("judge this essay " * 20, response_schema=Verdict.model_json_schema())
    first = await backend.generate(req)
    Verdict.model_validate_json(first.content or "")
    assert first.replica == "sim-0" and first.ttft_s is not None and first.ttft_s > 0
    assert first.usage.prompt_tokens > 16 and first.usage.cached_prompt_tokens == 0
    second = await backend.generate(req)
    assert second.content == first.content
    assert second.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 16
    assert backend.metrics().finished == 2


async def test_stream_tool_calls_and_pins_from_hints() -> None:
    rules = [ScriptRule(match="search", tool_calls=[ScriptedToolCall(name="search")])]
    backend = SimBackend.create(rules=rules, speed=50.0, policy="program")
    hints = SchedulingHints(program_id="run-1", pin_ttl_s=60.0)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    folded = await collect_stream(
        backend.stream(request("please search", hints=hints, tools=tools))
    )
    assert [c.name for c in folded.tool_calls] == ["search"]
    assert folded.finish_reason == "tool_calls" and folded.usage.completion_tokens > 0
    m = backend.metrics()
    assert m.pins_set == 1 and m.pins_active == 1
    assert backend.release_pins("run-1") == 1 and backend.metrics().pins_active == 0


async def test_requests_that_cannot_fit_raise_backend_error() -> None:
    from treadle.backends.sim.realtime import SimReplica

    backend = SimBackend(SimReplica.create(config=EngineConfig(kv_capacity_blocks=2)))
    with pytest.raises(BackendError) as info:
        await backend.generate(request("many words " * 100))
    assert not info.value.retryable and info.value.replica == "sim-0"


async def test_options_form_as_a_workflow_file_gives_them(tmp_path: object) -> None:
    backend = SimBackend(
        policy="priority", rules=[{"match": "ping", "content": "pong"}], speed=50.0, name="s1"
    )
    assert backend.name == "s1"
    answer = await backend.generate(request("ping", hints=SchedulingHints(priority=-3)))
    assert answer.content == "pong" and answer.replica == "s1"
    assert backend.replica.engine.policy == "priority"
    with pytest.raises(FileNotFoundError):
        SimBackend(profile="no_such_profile")
    unknown: Any = "lifo"
    with pytest.raises(ValueError):
        SimBackend(policy=unknown)
