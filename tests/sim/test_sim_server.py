"""`treadle sim serve`'s HTTP surface over real HTTP: uvicorn on a free port, httpx client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sim_serving import serving as sim_serving
from typer.testing import CliRunner

from treadle.backends.base import Message
from treadle.backends.scripted import ScriptedToolCall, ScriptRule
from treadle.backends.sim.engine import EngineConfig
from treadle.backends.sim.realtime import SimReplica, load_rules
from treadle.backends.sim.tokenizer import encode_chat, encode_completion
from treadle.cli.sim import app as sim_cli

pytestmark = pytest.mark.anyio

RULES = [
    ScriptRule(
        match="weather",
        tool_calls=[ScriptedToolCall(name="get_weather", arguments={"city": "Paris"})],
    ),
    ScriptRule(match="story", content="Once upon a time " + "there was a long story. " * 12),
]
MODEL = "sim-test"


@asynccontextmanager
async def serving(
    config: EngineConfig | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, SimReplica]]:
    async with sim_serving(rules=RULES, model=MODEL, config=config) as served:
        yield served


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def sse(client: httpx.AsyncClient, body: dict[str, Any]) -> list[Any]:
    """The stream's `data:` payloads, decoded (the final `[DONE]` kept as a string)."""
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_non_streaming_completion_and_cache_hit() -> None:
    async with serving() as (client, _):
        resp = await client.post("/v1/chat/completions", json=chat("tell me a story"))
        assert resp.status_code == 200
        body = resp.json()
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].startswith("Once upon a time")
        assert choice["finish_reason"] == "stop"
        prompt = encode_chat([Message(role="user", content="tell me a story")])
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        assert usage["completion_tokens"] == len(encode_completion(choice["message"]["content"]))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        again = (await client.post("/v1/chat/completions", json=chat("tell me a story"))).json()
        assert (
            again["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // 16 * 16
        )


async def test_streaming_chunks_in_openai_format() -> None:
    async with serving() as (client, _):
        whole = (await client.post("/v1/chat/completions", json=chat("a story please"))).json()
        events = await sse(
            client, chat("a story please", stream=True, stream_options={"include_usage": True})
        )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(texts) == whole["choices"][0]["message"]["content"]
    assert sum(1 for t in texts if t) > 3  # paced token by token, not one blob
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_tool_calls_from_a_script_rule() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    async with serving() as (client, _):
        body = (
            await client.post("/v1/chat/completions", json=chat("weather in Paris?", tools=tools))
        ).json()
        events = await sse(client, chat("weather in Paris?", tools=tools, stream=True))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    streamed = [tc for e in events[:-1] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert streamed == [{"index": 0, **call}]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_metrics_and_pin_extension_fields() -> None:
    async with serving() as (client, _):
        body = chat("a story", vllm_xargs={"program_id": "prog-1", "pin_ttl_s": 30})
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        text = (await client.get("/metrics")).text
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "treadle_sim_pins_active",
            "treadle_sim_pins_set_total",
            "treadle_sim_pins_released_total",
        ):
            assert name in samples, name
        assert samples["treadle_sim_pins_set_total"] == 1
        assert samples["treadle_sim_pins_active"] == 1
        assert samples["vllm:prefix_cache_queries_total"] > 0
        assert 0 < samples["vllm:kv_cache_usage_perc"] < 1  # the pinned blocks
        released = await client.post("/v1/pins/release", json={"program_id": "prog-1"})
        assert released.json() == {"released": 1}
        # `is_last_step` at the top level releases the program's pins and sets none.
        body = chat("again", program_id="prog-2", pin_ttl_s=30, priority=-1, unknown_field=1)
        await client.post("/v1/chat/completions", json=body)
        await client.post(
            "/v1/chat/completions", json=chat("last", program_id="prog-2", is_last_step=True)
        )
        text = (await client.get("/metrics")).text
        assert 'treadle_sim_pins_active{model_name="sim-test"} 0.0' in text
        assert 'treadle_sim_pins_released_total{model_name="sim-test"} 2.0' in text


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        (chat("x", n=2), 400, "n"),
        (chat("x", pin_ttl_s=-1), 400, "pin_ttl_s"),
        (chat("x", vllm_xargs={"pin_ttl_s": "soon"}), 400, None),
        (chat("x", max_tokens=0), 400, "max_tokens"),
        ({**chat("x"), "model": "gpt-9"}, 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(payload: Any, status: int, param: str | None) -> None:
    async with serving() as (client, _):
        if isinstance(payload, bytes):
            resp = await client.post(
                "/v1/chat/completions",
                content=payload,
                headers={"content-type": "application/json"},
            )
        else:
            resp = await client.post("/v1/chat/completions", json=payload)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


async def test_prompt_that_cannot_fit_is_a_400_streaming_or_not() -> None:
    async with serving(EngineConfig(kv_capacity_blocks=4)) as (client, _):
        long = chat("word " * 200)
        assert (await client.post("/v1/chat/completions", json=long)).status_code == 400
        resp = await client.post("/v1/chat/completions", json={**long, "stream": True})
        assert resp.status_code == 400
        assert "KV capacity" in resp.json()["error"]["message"]


async def test_models_health_and_max_tokens() -> None:
    async with serving() as (client, replica):
        tagged = await client.post(
            "/v1/chat/completions", json=chat("hi"), headers={"X-Request-Id": "req-42"}
        )
        assert tagged.json()["id"] == "req-42"
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert (await client.get("/health")).json()["replica"] == replica.name
        cut = (await client.post("/v1/chat/completions", json=chat("story", max_tokens=3))).json()
        assert cut["choices"][0]["finish_reason"] == "length"
        assert cut["usage"]["completion_tokens"] == 3
        assert cut["choices"][0]["message"]["content"] == "Once upon a"


def test_load_rules_and_cli(tmp_path: Any) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("- match: hello\n  content: hi there\n")
    assert load_rules(path) == [ScriptRule(match="hello", content="hi there")]
    (tmp_path / "bad.yaml").write_text("match: hello\n")
    with pytest.raises(ValueError, match="list of script rules"):
        load_rules(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("- match: [hello\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: not valid YAML"):
        load_rules(tmp_path / "broken.yaml")
    runner = CliRunner()
    assert "--replicas" in runner.invoke(sim_cli, ["serve", "--help"]).output
    bad = runner.invoke(sim_cli, ["serve", "--policy", "lifo"])
    assert bad.exit_code != 0 and "fcfs" in bad.output


async def test_cache_salt_keeps_prefix_caches_apart() -> None:
    """vLLM's `cache_salt`: prompts share cached blocks only with prompts of the same salt,
    so one tenant's cached-token counts tell nothing of what another asked."""
    text = "the quarterly numbers of the merger, " * 6

    async def cached(client: httpx.AsyncClient, salt: str | None) -> int:
        body = chat(text, **({"cache_salt": salt} if salt else {}))
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    async with serving() as (client, _):
        assert await cached(client, "tenant-a") == 0
        assert await cached(client, "tenant-a") > 0  # its own cache works
        assert await cached(client, "tenant-b") == 0  # another salt: nothing shared
        assert await cached(client, None) == 0  # nor with unsalted requests
