"""Trace context reaches the backend: the `traceparent` of each `chat` span is on the
request a backend receives, and over HTTP it arrives at the (simulated) serving engine."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from obs_sample import SAMPLE_INPUTS, sample_backend, sample_graph
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from treadle import Capabilities, Graph, LLMRequest, LLMResponse, Runtime
from treadle.runtime.observe.tracing import OtelTracer, current_trace_headers

pytestmark = pytest.mark.anyio


def parse_traceparent(value: str) -> tuple[int, int]:
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00"
    return int(trace_id, 16), int(span_id, 16)


class Recording:
    """A backend that records the headers of every request, then answers as scripted."""

    def __init__(self) -> None:
        self.inner = sample_backend()
        self.headers: list[dict[str, str]] = []

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def generate(self, request: LLMRequest) -> LLMResponse:
        self.headers.append(dict(request.headers))
        return await self.inner.generate(request)


def llm_spans(exporter: InMemorySpanExporter) -> dict[int, Any]:
    spans = exporter.get_finished_spans()
    return {s.context.span_id: s for s in spans if s.name.startswith("chat ")}


async def test_each_request_carries_its_llm_call_span() -> None:
    tracer, exporter = OtelTracer.in_memory()
    backend = Recording()
    runtime = Runtime(models={"default": backend}, listeners=[tracer.listener])
    await runtime.run(sample_graph(), SAMPLE_INPUTS)
    spans = llm_spans(exporter)
    assert len(backend.headers) == len(spans) == 2
    seen = set()
    for headers in backend.headers:
        trace_id, span_id = parse_traceparent(headers["traceparent"])
        span = spans[span_id]  # the header names exactly this call's span
        assert span.context.trace_id == trace_id
        seen.add(span_id)
    assert seen == set(spans)  # one distinct span per request


async def test_without_a_tracer_no_header_is_added() -> None:
    backend = Recording()
    await Runtime(models={"default": backend}).run(sample_graph(), SAMPLE_INPUTS)
    assert backend.headers and all("traceparent" not in h for h in backend.headers)


async def test_current_trace_headers_for_the_daemon_api() -> None:
    tracer, _ = OtelTracer.in_memory()
    assert current_trace_headers() == {}  # no current span
    with tracer.tracer.start_as_current_span("api request") as span:
        headers = current_trace_headers()
    trace_id, span_id = parse_traceparent(headers["traceparent"])
    assert (trace_id, span_id) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )
    # the worker side: a run under that context joins the request's trace
    g = Graph("tiny", inputs={"x": int})
    g.output(out=g.func("a", lambda x: x + 1, inputs={"x": g.input.x}).out)
    worker, exporter = OtelTracer.in_memory()
    worker.set_parent("r-1", headers["traceparent"])
    await Runtime(listeners=[worker.listener]).run(g, {"x": 1}, run_id="r-1")
    (run,) = [s for s in exporter.get_finished_spans() if s.name == "invoke_workflow tiny"]
    assert run.context.trace_id == trace_id
    assert run.parent is not None and run.parent.span_id == span_id


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def recording_asgi(app: ASGIApp, seen: list[dict[str, str]]) -> ASGIApp:
    async def wrapped(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    return wrapped


async def test_traceparent_arrives_at_the_simulated_engine_over_http() -> None:
    server_mod = pytest.importorskip("treadle.backends.sim.server")
    uvicorn = pytest.importorskip("uvicorn")
    from treadle.backends.openai_compat.backend import OpenAICompatBackend

    model = "sim-trace"
    replica = server_mod.build_replicas(1, speed=50.0, model=model)[0]
    seen: list[dict[str, str]] = []
    app = recording_asgi(server_mod.create_app(replica), seen)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    backend = OpenAICompatBackend(f"http://127.0.0.1:{port}/v1", model, retries=0)
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        g = Graph("over-http", inputs={"q": str})
        g.output(a=g.llm("ask", "Say hi to {q}.", inputs={"q": g.input.q}, max_tokens=8).out)
        tracer, exporter = OtelTracer.in_memory()
        runtime = Runtime(models={"default": backend}, listeners=[tracer.listener])
        result = await runtime.run(g, {"q": "Ada"})
        assert result.ok
    finally:
        await backend.aclose()
        server.should_exit = True
        await task
        sock.close()
    (headers,) = seen
    (span,) = llm_spans(exporter).values()
    assert parse_traceparent(headers["traceparent"]) == (
        span.context.trace_id,
        span.context.span_id,
    )
