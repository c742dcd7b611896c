"""Each dialect's fields as they arrive at a server: the recording server keeps every body
and header, and the tests compare them field by field with the upstream names (cited in
docs/engines.md)."""

from __future__ import annotations

from typing import Any

import pytest
from fake_openai_server import RunningServer

from treadle.backends.base import LLMRequest, SchedulingHints
from treadle.backends.openai_compat.backend import OpenAICompatBackend

pytestmark = pytest.mark.anyio

AGENT_CALL = SchedulingHints(
    priority=5,
    program_id="run-7",
    request_id="req-1",
    pin_ttl_s=42.5,
    is_last_step=False,
    next_tool="pytest",
    tenant="acme",
)
LAST_CALL = AGENT_CALL.model_copy(update={"is_last_step": True, "next_tool": None})
#: what every request carries whatever the dialect
CORE = {"model", "messages", "stream", "max_tokens", "max_completion_tokens"}


async def send(
    server: RunningServer, dialect: str, hints: SchedulingHints, **options: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    scenario = f"record-{dialect}-{len(server.state.requests)}"
    async with OpenAICompatBackend(
        f"{server.url}/{scenario}/v1", "served", dialect=dialect, dialect_options=options
    ) as backend:
        request = LLMRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "hints": hints}
        )
        await backend.generate(request)
    (body,) = server.state.requests[scenario]
    (headers,) = server.state.headers[scenario]
    return {k: v for k, v in body.items() if k not in CORE}, headers


def _wire_id(value: str) -> str:
    call_id, _, suffix = value.rpartition(".")
    assert len(suffix) == 8
    return call_id


async def test_dynamo_nvext_and_session_headers(fake_server: RunningServer) -> None:
    body, headers = await send(
        fake_server,
        "dynamo",
        AGENT_CALL,
        priority_hints=True,
        speculative_prefill=True,
        cache_control=True,
    )
    assert body == {
        "nvext": {
            "agent_hints": {"priority": -5, "speculative_prefill": True},
            "cache_control": {"type": "ephemeral", "ttl": "43s"},
        }
    }
    assert _wire_id(headers["x-request-id"]) == "req-1"
    assert headers["x-dynamo-session-id"] == "run-7"
    assert "x-dynamo-session-final" not in headers


async def test_dynamo_last_step_closes_the_session_and_pins_nothing(
    fake_server: RunningServer,
) -> None:
    body, headers = await send(
        fake_server, "dynamo", LAST_CALL, speculative_prefill=True, cache_control=True
    )
    assert body == {}
    assert headers["x-dynamo-session-final"] == "true"


async def test_dynamo_by_default_sends_identity_only(fake_server: RunningServer) -> None:
    body, headers = await send(fake_server, "dynamo", AGENT_CALL)
    assert body == {}
    assert headers["x-dynamo-session-id"] == "run-7"


async def test_llamacpp_asks_for_the_prompt_cache(fake_server: RunningServer) -> None:
    body, headers = await send(fake_server, "llamacpp", AGENT_CALL, extra_body={"top_k": 1})
    assert body == {"cache_prompt": True, "top_k": 1}
    assert "x-request-id" not in headers


async def test_continuum_job_fields(fake_server: RunningServer) -> None:
    body, headers = await send(fake_server, "continuum", AGENT_CALL)
    assert body == {"job_id": "run-7", "is_last_step": False, "this_func_call": "pytest"}
    assert _wire_id(headers["x-request-id"]) == "req-1"


async def test_vllm_priority_salt_and_xargs(fake_server: RunningServer) -> None:
    body, _ = await send(fake_server, "vllm", AGENT_CALL, priority_scheduling=True)
    assert body == {
        "priority": 5,
        "vllm_xargs": {
            "treadle_program_id": "run-7",
            "treadle_pin_ttl_s": 42.5,
            "treadle_next_tool": "pytest",
            "treadle_is_last_step": 0,
        },
    }


async def test_sglang_rid_and_priority(fake_server: RunningServer) -> None:
    body, _ = await send(fake_server, "sglang", AGENT_CALL, priority_scheduling=True)
    assert _wire_id(body.pop("rid")) == "req-1"
    assert body == {"priority": -5}
