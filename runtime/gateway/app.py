"""The gateway's HTTP API, OpenAI-compatible:

- `POST /v1/chat/completions` — scheduled, routed to a replica, answered as the replica
  answers: a stream's bytes pass through as they arrive (nothing is buffered), a whole
  answer as it came. treadle's hints ride in the body's `treadle` field or `X-Treadle-*`
  headers (`treadle.backends.openai_compat.hint_wire`); the field is removed before the
  call goes on. A replica that fails before the first byte of its answer (cannot connect,
  429/5xx, a stream that breaks before its first chunk) is skipped and the call goes to
  another; a replica's 4xx is the caller's and is passed back as it came. A client that
  disconnects closes the upstream request, which ends the generation at the engine.
- `POST /v1/programs/{id}/end` — a program (run) is over: its place in the scheduler goes.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

Malformed requests get a 4xx naming what is wrong, in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from treadle.backends.base import SchedulingHints
from treadle.backends.openai_compat.hint_wire import (
    BODY_FIELD,
    HintError,
    WireHints,
    session_of,
)
from treadle.runtime.gateway.metrics import GatewayMetrics
from treadle.runtime.gateway.scheduling import Admitted, CallWithdrawn, GatewayScheduler
from treadle.runtime.gateway.tracing import GatewaySpan, GatewayTracing
from treadle.runtime.gateway.upstream import ModelPool, NoReplica, Routed, upstream_request

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: upstream statuses that are the replica's trouble, not the request's: another may do
_REPLICA_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_JSON = "application/json"


class _Refused(Exception):
    """A request the gateway answers itself with a 4xx/5xx."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> Response:
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}
    body = {
        "error": {
            "message": message,
            "type": kind.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON)


class Gateway:
    """What the app serves with: the pools, the scheduler, the HTTP client, tracing and
    metrics."""

    def __init__(
        self,
        pools: dict[str, ModelPool],
        scheduler: GatewayScheduler,
        client: httpx.AsyncClient,
        *,
        tracing: GatewayTracing | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.pools = pools
        self.scheduler = scheduler
        self.client = client
        self.tracing = tracing or GatewayTracing()
        self.metrics = metrics or GatewayMetrics(scheduler, pools)
        self.started = time.time()

    # -- the request ---------------------------------------------------------------------

    def parse(self, raw: bytes, headers: Any) -> tuple[dict[str, Any], ModelPool, WireHints]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Refused(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _Refused(400, f"the body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _Refused(400, "'model' is required: the name of a served model", "model")
        pool = self.pools.get(model)
        if pool is None:
            served = ", ".join(sorted(self.pools))
            raise _Refused(
                404, f"the model `{model}` is not served here (served: {served})", "model"
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refused(400, "'messages' must be a non-empty list of messages", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _Refused(400, f"messages[{i}] must be an object", f"messages[{i}]")
            role = m.get("role")
            if role not in _ROLES:
                raise _Refused(
                    400,
                    f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, got {role!r}",
                    f"messages[{i}].role",
                )
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                raise _Refused(
                    400,
                    f"messages[{i}].content must be a string, a list or null",
                    f"messages[{i}].content",
                )
        if not isinstance(body.get("stream", False), bool):
            raise _Refused(400, "'stream' must be true or false", "stream")
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise _Refused(400, f"'{name}' must be a positive integer", name)
        try:
            hints = WireHints.parse(body.pop(BODY_FIELD, None), headers)
        except HintError as exc:
            raise _Refused(400, str(exc), BODY_FIELD) from None
        return body, pool, hints

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            body, pool, hints = self.parse(await request.body(), request.headers)
        except _Refused as exc:
            self.metrics.refused(exc.status)
            return _error(exc.status, str(exc), exc.param)
        program = hints.program_id or session_of(request.headers)
        features = pool.features(body, program)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        try:
            admitted = await self.scheduler.admit(
                pool.served, hints, program, features.prompt_tokens, max_tokens
            )
        except CallWithdrawn as exc:
            return _error(409, str(exc))
        self.metrics.queue_wait.observe(time.perf_counter() - started)
        span = self.tracing.start(pool.served, request.headers)
        span.set("treadle.program_id", admitted.program_id)
        span.set("treadle.tenant", hints.tenant)
        engine_hints = SchedulingHints(
            priority=admitted.call.priority,
            program_id=admitted.program_id,
            request_id=hints.request_id or admitted.call.call_id,
            is_last_step=hints.last_llm_step,
            next_tool=hints.next_tool,
            tenant=hints.tenant,
        )
        call = _Call(self, pool, admitted, span, body, engine_hints, features)
        try:
            if body.get("stream"):
                return await call.stream()
            return await call.whole(request)
        except BaseException as exc:
            call.close(error=type(exc).__name__, ok=False)
            raise


class _Call:
    """One admitted call on its way through replicas (`stream` or `whole`)."""

    def __init__(
        self,
        gw: Gateway,
        pool: ModelPool,
        admitted: Admitted,
        span: GatewaySpan,
        body: dict[str, Any],
        hints: SchedulingHints,
        features: Any,
    ) -> None:
        self.gw = gw
        self.pool = pool
        self.admitted = admitted
        self.span = span
        self.body = body
        self.hints = hints
        self.features = features
        self.tried: set[int] = set()
        self.routed: Routed | None = None
        self.usage: dict[str, Any] | None = None
        self.ttft_s: float | None = None
        self.closed = False

    async def _send(self, stream: bool) -> httpx.Response | Response:
        """The first replica that takes the call: its open response (status < 400 or a
        4xx that is the caller's), or the gateway's own error when none can."""
        gw, pool = self.gw, self.pool
        while True:
            try:
                routed = pool.route(self.features, self.tried)
            except NoReplica as exc:
                self.close(error="no replica", ok=False)
                return _error(503, str(exc))
            self.routed = routed
            content, headers = upstream_request(
                routed.replica, self.body, self.hints, self.span.headers
            )
            request = gw.client.build_request(
                "POST", routed.replica.chat_url, content=content, headers=headers
            )
            self.sent_at = time.perf_counter()
            try:
                response = await gw.client.send(request, stream=stream)
            except httpx.TransportError as exc:
                self._retry(routed, f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code in _REPLICA_STATUS:
                raw = await response.aread()
                await response.aclose()
                self._retry(routed, f"answered {response.status_code}: {raw[:200]!r}")
                continue
            return response

    def _retry(self, routed: Routed, error: str) -> None:
        self.pool.failed(routed, error, replica_fault=True)
        self.tried.add(routed.index)
        self.routed = None
        self.gw.metrics.retries.labels(self.pool.served).inc()

    async def whole(self, request: Request) -> Response:
        """A non-streamed answer; the upstream call is cancelled if the client leaves."""
        result: list[Response] = []
        async with anyio.create_task_group() as tg:

            async def answer() -> None:
                result.append(await self._whole())
                tg.cancel_scope.cancel()

            tg.start_soon(_until_disconnect, request, tg.cancel_scope)
            tg.start_soon(answer)
        if not result:  # the client went away: the upstream request was closed
            self.gw.metrics.aborted.labels(self.pool.served).inc()
            self.close(error="client disconnected", ok=False)
            return Response(status_code=499)
        return result[0]

    async def _whole(self) -> Response:
        response = await self._send(stream=False)
        if isinstance(response, Response):
            return response
        raw = response.content
        status = response.status_code
        if status < 400:
            self.ttft_s = time.perf_counter() - self.sent_at
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                self.usage = orjson.loads(raw).get("usage")
        self.close(error=None if status < 400 else f"upstream {status}", ok=status < 400)
        return Response(raw, status_code=status, media_type=_JSON)

    async def stream(self) -> Response:
        """A streamed answer: the first chunk is read before the response starts, so a
        replica that fails before it is replaced by another."""
        while True:
            response = await self._send(stream=True)
            if isinstance(response, Response):
                return response
            if response.status_code >= 400:
                raw = await response.aread()
                await response.aclose()
                self.close(error=f"upstream {response.status_code}", ok=False)
                return Response(raw, status_code=response.status_code, media_type=_JSON)
            chunks = response.aiter_raw()
            try:
                first = await anext(chunks)
            except (httpx.TransportError, StopAsyncIteration) as exc:
                await response.aclose()
                assert self.routed is not None
                self._retry(self.routed, f"the stream ended before its first chunk: {exc!r}")
                continue
            self.ttft_s = time.perf_counter() - self.sent_at
            assert self.routed is not None
            self.pool.first_token(self.routed)
            return StreamingResponse(
                self._pass(first, chunks, response),
                media_type="text/event-stream",
                headers={"x-treadle-replica": self.routed.replica.name},
            )

    async def _pass(
        self, first: bytes, chunks: AsyncIterator[bytes], response: httpx.Response
    ) -> AsyncIterator[bytes]:
        error: str | None = "client disconnected"
        tail = b""
        try:
            yield first
            tail = first[-4096:]
            async for piece in chunks:
                yield piece
                # usage comes in the last events: keep only the stream's tail
                tail = (tail + piece)[-4096:]
            error = None
        except httpx.TransportError as exc:
            error = f"the stream broke: {exc!r}"
            raise
        finally:
            await response.aclose()
            if error is None:
                self.usage = _usage_of_tail(tail)
            elif error == "client disconnected":
                self.gw.metrics.aborted.labels(self.pool.served).inc()
            self.close(error=error, ok=error is None)

    def close(self, *, error: str | None, ok: bool) -> None:
        """Account for the call once: the router, the scheduler, the span, the metrics."""
        if self.closed:
            return
        self.closed = True
        usage = self.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        if self.routed is not None:
            if ok:
                self.pool.succeeded(self.routed, cached)
            else:
                self.pool.failed(self.routed, error or "failed", replica_fault=False)
            self.span.set("treadle.replica", self.routed.replica.name)
        self.gw.scheduler.finish(
            self.admitted,
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=cached,
            completion_tokens=usage.get("completion_tokens"),
            ttft_s=self.ttft_s,
            ok=ok,
        )
        self.span.set("gen_ai.usage.input_tokens", usage.get("prompt_tokens"))
        self.span.set("gen_ai.usage.output_tokens", usage.get("completion_tokens"))
        self.span.end(error)
        self.gw.metrics.finished(self.pool.served, ok, self.ttft_s, usage)


def _usage_of_tail(tail: bytes) -> dict[str, Any] | None:
    """The usage object of a stream's last events (`data: {... "usage": {...}}`)."""
    at = tail.rfind(b'"usage":{')
    if at < 0:
        return None
    start = tail.rfind(b"data:", 0, at)
    end = tail.find(b"\n", at)
    if start < 0:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):
        event = orjson.loads(tail[start + 5 : end if end >= 0 else None])
        usage = event.get("usage") if isinstance(event, dict) else None
        return usage if isinstance(usage, dict) else None
    return None


async def _until_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    """Cancel `scope` when the client disconnects (the body has been read already, so
    the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def create_app(gateway: Gateway) -> FastAPI:
    """The HTTP app over `gateway` (module docstring)."""
    app = FastAPI(title="treadle gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        return await gateway.chat(request)

    @app.post("/v1/programs/{program_id}/end")
    async def end_program(program_id: str) -> dict[str, bool]:
        return {"ended": gateway.scheduler.end_program(program_id)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(gateway.started)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "treadle"}
                for name in gateway.pools
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": {
                name: [{"name": r.name, "breaker": r.breaker.state.value} for r in pool.replicas]
                for name, pool in gateway.pools.items()
            },
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
