"""A small OpenAI-compatible server on a real port, for the HTTP backends' tests.

The first path segment picks a behaviour: `http://127.0.0.1:PORT/<scenario>/v1` answers
normally (`ok`), streams (`stream`), returns tool calls (`tools`, `stream_tools`), garbage
(`garbage`, `no_choices`, `bad_tool_json`, `stream_garbage`), fails then succeeds
(`flaky-N-<id>`: N answers 500 first), always fails (`down`), refuses (`refuse`), breaks a
stream (`stream_cut`, `stream_error`) or hangs (`hang`); `record-<name>` answers as `ok`,
in a recording of its own. Every request's body and headers
are recorded per scenario. `/metrics` serves text in vLLM's exposition format.
Imported by `conftest.py` (fixtures) and by the tests (types, sample texts).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

# Captured from the format of vllm/v1/metrics/loggers.py (two data-parallel engines).
VLLM_METRICS_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama-8b"} 3.0
vllm:num_requests_running{engine="1",model_name="llama-8b"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama-8b"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama-8b"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. DEPRECATED: Use vllm:kv_cache_usage_perc.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="llama-8b"} 0.5
vllm:gpu_cache_usage_perc{engine="1",model_name="llama-8b"} 0.3
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama-8b"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama-8b"} 0.3
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama-8b"} 6000.0
vllm:prefix_cache_queries_total{engine="1",model_name="llama-8b"} 4000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama-8b"} 3000.0
vllm:prefix_cache_hits_total{engine="1",model_name="llama-8b"} 1000.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="llama-8b"} 7.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama-8b"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama-8b"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama-8b"} 1.25
"""

SGLANG_METRICS_TEXT = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="llama-8b"} 7.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="llama-8b"} 2.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="llama-8b"} 0.28
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="llama-8b"} 0.75
"""


@dataclass
class FakeState:
    requests: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    headers: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    metrics_text: str = VLLM_METRICS_TEXT


def _completion(message: dict[str, Any], finish: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "served-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


def _chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    data = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "served-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(data)}\n\n"


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 8},
}


def _sse(parts: list[str]) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        for part in parts:
            yield part
            await asyncio.sleep(0)

    return StreamingResponse(gen(), media_type="text/event-stream")


def create_fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()
    flaky_counts: dict[str, int] = defaultdict(int)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics_text)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/{scenario}/metrics")
    async def scenario_metrics(scenario: str) -> Response:
        if scenario == "garbage":
            return PlainTextResponse("<html>this is not prometheus</html>")
        if scenario == "sglang":
            return PlainTextResponse(SGLANG_METRICS_TEXT)
        return Response(status_code=404)

    @app.get("/{scenario}/health")
    async def scenario_health(scenario: str) -> Response:
        return Response(status_code=200 if scenario == "ok" else 503)

    @app.post("/{scenario}/v1/chat/completions")
    async def chat(scenario: str, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse({"detail": "bad json"}, status_code=422)
        state.requests[scenario].append(body)
        state.headers[scenario].append(dict(request.headers))

        if scenario == "ok" or scenario.startswith("record-"):
            return JSONResponse(
                _completion({"role": "assistant", "content": "hello there"}, "stop", USAGE)
            )
        if scenario == "tools":
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "search", "arguments": '{"q": "x"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "calc", "arguments": '{"expr": "1+1"}'},
                    },
                ],
            }
            return JSONResponse(_completion(message, "tool_calls", USAGE))
        if scenario == "garbage":
            return PlainTextResponse("this is not json at all")
        if scenario == "no_choices":
            return JSONResponse({"id": "x", "object": "chat.completion", "usage": USAGE})
        if scenario == "bad_tool_json":
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "search", "arguments": '{"q": '},
                    }
                ],
            }
            return JSONResponse(_completion(message, "tool_calls", USAGE))
        if scenario.startswith("flaky-"):
            failures = int(scenario.split("-")[1])
            flaky_counts[scenario] += 1
            if flaky_counts[scenario] <= failures:
                return JSONResponse(
                    {"error": {"message": "engine overloaded", "code": 500}}, status_code=500
                )
            return JSONResponse(
                _completion({"role": "assistant", "content": "recovered"}, "stop", USAGE)
            )
        if scenario == "down":
            return JSONResponse(
                {"error": {"message": "no capacity"}},
                status_code=503,
                headers={"Retry-After": "0"},
            )
        if scenario == "refuse":
            return JSONResponse(
                {
                    "error": {
                        "message": "Got priority 5 but Priority scheduling is not enabled.",
                        "type": "BadRequestError",
                        "code": 400,
                    }
                },
                status_code=400,
            )
        if scenario == "hang":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return JSONResponse({"detail": "too late"})
        if scenario == "stream":
            parts = [_chunk({"role": "assistant", "content": ""})]
            parts += [_chunk({"content": piece}) for piece in ("Hel", "lo", " wor", "ld")]
            parts.append(": keep-alive comment\n\n")
            parts.append(_chunk({}, "stop"))
            usage_event = {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": USAGE,
            }
            parts.append(f"data: {json.dumps(usage_event)}\n\n")
            parts.append("data: [DONE]\n\n")
            return _sse(parts)
        if scenario == "stream_tools":
            # Two parallel calls whose pieces interleave, arguments split mid-token, and
            # the events themselves split across network writes.
            events = [
                _chunk({"role": "assistant", "content": None}),
                _chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ]
                    }
                ),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
                _chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 1,
                                "id": "call_2",
                                "type": "function",
                                "function": {"name": "get_time", "arguments": '{"tz"'},
                            }
                        ]
                    }
                ),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}),
                _chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "CET"}'}}]}),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
                _chunk({}, "tool_calls"),
                f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\n",
                "data: [DONE]\n\n",
            ]
            text = "".join(events)
            return _sse([text[i : i + 37] for i in range(0, len(text), 37)])
        if scenario == "stream_garbage":
            return _sse([_chunk({"content": "a"}), "data: {not json\n\n"])
        if scenario == "stream_cut":
            return _sse([_chunk({"content": "partial"})])
        if scenario == "stream_error":
            error = {"error": {"message": "CUDA out of memory", "code": 500}}
            return _sse([_chunk({"content": "a"}), f"data: {json.dumps(error)}\n\n"])
        return JSONResponse({"detail": f"unknown scenario {scenario}"}, status_code=404)

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    state: FakeState

    def base(self, scenario: str) -> str:
        return f"{self.url}/{scenario}/v1"


@contextmanager
def serve_in_thread(app: Any, *, lifespan: Literal["auto", "on", "off"] = "auto") -> Iterator[str]:
    """Run `app` under uvicorn on a free port in a thread; yield its URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan=lifespan,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
