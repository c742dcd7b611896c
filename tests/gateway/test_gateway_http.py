"""`treadle gateway` over real HTTP: two simulator replicas on loopback, the gateway in
front, the official `openai` client (and plain httpx for what clients cannot send)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import openai
import pytest
from gateway_support import MODEL, gateway_over, replicas

from treadle.backends.scripted import ScriptRule

pytestmark = pytest.mark.anyio

LONG = ScriptRule(match="long story", content=" ".join(f"word{i}" for i in range(3000)))


_CLIENTS: list[openai.AsyncOpenAI] = []


def _client(url: str) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    _CLIENTS.append(client)
    return client


async def _metrics(url: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(url.removesuffix("/v1") + "/metrics")).text


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


async def test_openai_client_whole_and_streamed_answers_match_the_replica() -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    async with replicas(2) as sims, gateway_over(sims.urls) as (svc, url):
        direct = await _client(sims.urls[0]).chat.completions.create(
            model=MODEL, messages=question, max_tokens=12
        )
        client = _client(url)
        whole = await client.chat.completions.create(model=MODEL, messages=question, max_tokens=12)
        assert whole.choices[0].message.content == direct.choices[0].message.content
        assert whole.usage is not None and whole.usage.completion_tokens == 12
        stream = await client.chat.completions.create(
            model=MODEL, messages=question, max_tokens=12, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert len(pieces) > 2  # streamed in pieces, not one buffered answer
        assert "".join(pieces) == direct.choices[0].message.content
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        # both calls were counted against the default tenant, each a program of its own
        assert svc.gateway.scheduler.service_by_tenant()["default"] > 0
        assert not svc.gateway.scheduler.programs


async def test_same_prefix_goes_to_the_same_replica() -> None:
    system = "You are a careful assistant. " * 80  # a long shared prefix (~2,400 chars)
    async with replicas(2) as sims, gateway_over(sims.urls) as (_, url):
        client = _client(url)
        for i in range(6):
            await client.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"question {i}"},
                ],
                max_tokens=4,
            )
        counts = sorted(len(r.headers) for r in sims.recorded)
        assert counts == [0, 6]
        # the replica's prefix cache served the shared prefix from the second call on
        hits = sum(r.engine.prefix_hits for r in sims.replicas)
        assert hits > 0


async def test_hints_from_body_and_headers_reach_the_scheduler_and_the_engine() -> None:
    async with replicas(1) as sims, gateway_over(sims.urls, tenants={"acme": 2}) as (svc, url):
        client = _client(url)
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "plan the trip"}],
            max_tokens=4,
            extra_body={
                "treadle": {
                    "program_id": "run-1",
                    "tenant": "acme",
                    "steps_to_execution": 2,
                    "next_tool": "search",
                    "tool_duration_s": 3.5,
                }
            },
        )
        sched = svc.gateway.scheduler
        assert "run-1" in sched.programs  # open: not its last step
        program = sched.scheduler.programs["run-1"]
        assert program.tenant.name == "acme" and program.tenant.weight == 2
        assert program.idle_until > 0  # told the tool's duration
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                "/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "done?"}]},
                headers={
                    "X-Treadle-Program-Id": "run-1",
                    "X-Treadle-Tenant": "acme",
                    "X-Treadle-Last-Llm-Step": "true",
                },
            )
        assert r.status_code == 200, r.text
        assert "run-1" not in sched.programs  # its last step closed it
        # the sim dialect sent the program upstream
        sent = sims.recorded[0].headers
        assert len(sent) == 2 and all(h.get("x-request-id") for h in sent)


async def test_session_header_gives_a_plain_client_affinity() -> None:
    async with replicas(2) as sims, gateway_over(sims.urls) as (svc, url):
        client = _client(url)
        for i in range(4):
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"unrelated question {i} " * (i + 1)}],
                max_tokens=2,
                extra_headers={"X-Session-Id": "chat-42"},
            )
        assert "chat-42" in svc.gateway.scheduler.programs
        assert sorted(len(r.headers) for r in sims.recorded) == [0, 4]


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b"{not json", {}, 400, "not JSON"),
        (b"[1, 2]", {}, 400, "JSON object"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', {}, 400, "'model' is required"),
        (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', {}, 404, "gpt-9"),
        (b'{"model": "sim-small", "messages": []}', {}, 400, "'messages'"),
        (b'{"model": "sim-small", "messages": [{"role": "robot"}]}', {}, 400, "messages[0].role"),
        (
            b'{"model": "sim-small", "messages": [{"role": "user", "content": 5}]}',
            {},
            400,
            "messages[0].content",
        ),
        (
            b'{"model": "sim-small", "stream": "yes", "messages": [{"role": "user"}]}',
            {},
            400,
            "'stream'",
        ),
        (
            b'{"model": "sim-small", "max_tokens": 0, "messages": [{"role": "user"}]}',
            {},
            400,
            "max_tokens",
        ),
        (
            b'{"model": "sim-small", "treadle": {"tenant": 3}, "messages": [{"role": "user"}]}',
            {},
            400,
            "treadle.tenant",
        ),
        (
            b'{"model": "sim-small", "treadle": {"colour": "red"}, "messages": [{"role": "user"}]}',
            {},
            400,
            "treadle.colour",
        ),
        (
            b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}]}',
            {"X-Treadle-Human-Wait": "perhaps"},
            400,
            "X-Treadle-Human-Wait",
        ),
        (
            b'{"model": "sim-small", "messages": [{"role": "user", "content": "x"}]}',
            {"X-Treadle-Favourite": "1"},
            400,
            "X-Treadle-Favourite",
        ),
    ],
)
async def test_bad_requests_get_a_4xx_naming_the_problem(
    body: bytes, headers: dict[str, str], status: int, says: str
) -> None:
    async with replicas(1) as sims, gateway_over(sims.urls) as (_, url):
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                "/chat/completions",
                content=body,
                headers={"content-type": "application/json", **headers},
            )
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert says in error["message"]
        assert error["code"] == status
        assert not sims.recorded[0].headers  # nothing went upstream


async def test_an_engine_4xx_is_passed_back_as_it_came() -> None:
    async with replicas(2) as sims, gateway_over(sims.urls) as (svc, url):
        with pytest.raises(openai.BadRequestError, match="max_model_len"):
            await _client(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**7
            )
        # the caller's mistake: not retried on the other replica
        assert sum(len(r.headers) for r in sims.recorded) == 1
        assert svc.gateway.scheduler.in_flight() == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_replica_is_skipped_before_the_first_token(stream: bool) -> None:
    async with replicas(1) as sims:
        # a replica that refuses connections, first in the pool
        dead = "http://127.0.0.1:9/v1"
        async with gateway_over([dead, *sims.urls], model_options={"routing": "round_robin"}) as (
            svc,
            url,
        ):
            client = _client(url)
            for _ in range(4):
                response = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=4,
                    stream=stream,
                )
                if stream:
                    assert [c async for c in response]  # type: ignore[union-attr]
            assert len(sims.recorded[0].headers) == 4
            text = await _metrics(url)
            assert 'treadle_gateway_retries_total{model="sim-small"}' in text
            dead_replica = svc.gateway.pools[MODEL].replicas[0]
            assert dead_replica.failures >= 1 and "ConnectError" in (dead_replica.last_error or "")


async def test_no_usable_replica_is_a_503_naming_each() -> None:
    async with gateway_over(["http://127.0.0.1:9/v1"]) as (_, url):
        with pytest.raises(openai.APIStatusError) as err:
            await _client(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.status_code == 503
        assert "sim-small-0" in str(err.value) and "ConnectError" in str(err.value)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_the_call_at_the_engine(stream: bool) -> None:
    async with replicas(1, rules=[LONG], speed=1.0) as sims, gateway_over(sims.urls) as (svc, url):
        engine = sims.replicas[0].engine
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 3000,
            "stream": stream,
        }
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            if stream:
                async with http.stream("POST", "/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_raw():
                        break  # the first piece, then the client goes away
            else:
                with anyio.move_on_after(0.5):
                    await http.post("/chat/completions", json=body)
        with anyio.fail_after(10):
            while engine.n_aborted < 1 or svc.gateway.scheduler.in_flight():
                await anyio.sleep(0.02)
        assert engine.n_aborted == 1
        text = await _metrics(url)
        assert 'treadle_gateway_aborted_total{model="sim-small"} 1.0' in text


async def test_trace_context_continues_through_a_gateway_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with (
        replicas(1) as sims,
        gateway_over(sims.urls, tracer_provider=provider) as (_, url),
    ):
        await _client(url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
        )
    (span,) = exporter.get_finished_spans()
    assert span.name == f"chat {MODEL}"
    assert span.parent is not None and f"{span.parent.span_id:016x}" == caller_span
    assert f"{span.context.trace_id:032x}" == trace_id
    upstream = sims.recorded[0].headers[0]["traceparent"]
    assert upstream == f"00-{trace_id}-{span.context.span_id:016x}-01"
    assert span.attributes is not None and span.attributes["treadle.replica"] == "sim-small-0"
