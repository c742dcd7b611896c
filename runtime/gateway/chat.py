"""`POST /v1/chat/completions`, the gateway's hot path, as a plain ASGI handler (no
framework objects per request: the body is read, checked and passed on as JSON bytes).

A call is parsed and checked (a 4xx names what is wrong, in OpenAI's error shape), waits
for the scheduler, is routed to a replica and sent with the replica's dialect fields. A
stream's bytes pass through as they arrive (nothing is buffered); a whole answer comes
back as it came. A replica that fails before the first byte of its answer (cannot
connect, 429/5xx, a stream that ends before its first chunk) is skipped for another; a
replica's 4xx is the caller's and is passed back unchanged. A client that disconnects
cancels the handler, which closes the upstream request: the engine aborts the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from treadle.backends.base import SchedulingHints
from treadle.backends.dispatch.routing import RequestFeatures
from treadle.backends.openai_compat.hint_wire import BODY_FIELD, HintError, WireHints, session_of
from treadle.errors import GatewayError
from treadle.runtime.gateway.scheduling import Admitted, CallWithdrawn
from treadle.runtime.gateway.tracing import GatewaySpan
from treadle.runtime.gateway.upstream import (
    ModelPool,
    NoReplicaAvailable,
    Routed,
    upstream_request,
)

if TYPE_CHECKING:
    from treadle.runtime.gateway.context import Gateway

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: upstream statuses that are the replica's trouble, not the request's: another may do
_REPLICA_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_KINDS = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError",
          503: "ServiceUnavailableError"}  # fmt: skip
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _Refused(GatewayError):
    """A request the gateway answers itself (a 4xx, or a 503 when no replica can); it
    never leaves the handler."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind = _KINDS.get(status, "APIError")
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


async def respond(send: Send, status: int, body: bytes, headers: list[Any] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers or _JSON_HEADERS})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def parse_chat(
    raw: bytes, headers: dict[str, str], pools: dict[str, ModelPool]
) -> tuple[dict[str, Any], ModelPool, WireHints]:
    """The body, the model's pool and the hints of a chat request; `_Refused` says what
    is wrong with it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Refused(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Refused(400, f"the body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Refused(400, "'model' is required: the name of a served model", "model")
    pool = pools.get(model)
    if pool is None:
        served = ", ".join(sorted(pools))
        raise _Refused(404, f"the model `{model}` is not served here (served: {served})", "model")
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


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers the gateway reads (treadle's, sessions, trace context)."""
    out: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key.startswith((b"x-treadle-", b"x-session-id", b"trace")):
            out[key.decode("latin-1")] = value.decode("latin-1")
    return out


async def _read_body(receive: Receive) -> bytes | None:
    """The request body; None when the client disconnected before sending all of it."""
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
    return bytes(body)


async def handle_chat(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI handler of `POST /v1/chat/completions` (module docstring)."""
    started = time.perf_counter()
    raw = await _read_body(receive)
    if raw is None:
        return
    headers = _headers(scope)
    try:
        body, pool, hints = parse_chat(raw, headers, gw.pools)
    except _Refused as exc:
        gw.metrics.refused(exc.status)
        await respond(send, exc.status, error_body(exc.status, str(exc), exc.param))
        return
    # the client's disconnect cancels this handler, wherever it waits
    task = asyncio.current_task()
    assert task is not None
    gone: list[bool] = []
    finished: list[bool] = []

    def on_message(fut: asyncio.Future[Any]) -> None:
        # `finished`: the handler returned before this ran (the task is uvicorn's again)
        if finished or fut.cancelled() or fut.exception() is not None:
            return
        if fut.result()["type"] == "http.disconnect":
            gone.append(True)
            task.cancel()

    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_message)
    call: _Call | None = None
    try:
        program = hints.program_id or session_of(headers)
        features = pool.features(body, program)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        try:
            admitted = await gw.scheduler.admit(
                pool.served, hints, program, features.prompt_tokens, max_tokens
            )
        except CallWithdrawn as exc:
            await respond(send, 409, error_body(409, str(exc)))
            return
        gw.metrics.queue_wait.observe(time.perf_counter() - started)
        call = _Call(gw, pool, admitted, gw.tracing.start(pool.served, headers), body, features)
        if body.get("stream"):
            await call.stream(send)
        else:
            await call.whole(send)
    except asyncio.CancelledError:
        if not gone:
            raise
        # the client went away: the upstream request was closed on the way out
        gw.metrics.aborted_call(pool.served)
        if call is not None:
            call.close(error="client disconnected", ok=False)
    except BaseException as exc:
        if call is not None:
            call.close(error=f"{type(exc).__name__}: {exc}", ok=False)
        raise
    finally:
        finished.append(True)
        watcher.remove_done_callback(on_message)
        watcher.cancel()


class _Call:
    """One admitted call on its way through replicas (`stream` or `whole`)."""

    __slots__ = ("admitted", "body", "closed", "features", "gw", "hints", "pool", "routed",
                 "sent_at", "span", "tried", "ttft_s", "usage")  # fmt: skip

    def __init__(
        self,
        gw: Gateway,
        pool: ModelPool,
        admitted: Admitted,
        span: GatewaySpan,
        body: dict[str, Any],
        features: RequestFeatures,
    ) -> None:
        self.gw = gw
        self.pool = pool
        self.admitted = admitted
        self.span = span
        self.body = body
        self.features = features
        wire = admitted.hints
        # what the engines' dialects get: the scheduler's priority and the program
        self.hints = SchedulingHints(
            priority=admitted.call.priority,
            program_id=admitted.program_id,
            request_id=wire.request_id or admitted.call.call_id,
            is_last_step=wire.last_llm_step,
            next_tool=wire.next_tool,
            tenant=wire.tenant,
        )
        self.tried: set[int] = set()
        self.routed: Routed | None = None
        self.usage: dict[str, Any] | None = None
        self.ttft_s: float | None = None
        self.sent_at = 0.0
        self.closed = False

    async def _send(self, stream: bool) -> httpx.Response:
        """The first replica that takes the call: its open response (a success, or a 4xx
        that is the caller's). `_Refused` (503) when none can."""
        gw, pool = self.gw, self.pool
        while True:
            try:
                routed = pool.route(self.features, self.tried)
            except NoReplicaAvailable as exc:
                raise _Refused(503, str(exc)) from None
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
        self.gw.metrics.retry(self.pool.served)

    async def whole(self, send: Send) -> None:
        try:
            response = await self._send(stream=False)
        except _Refused as exc:
            self.close(error=str(exc), ok=False)
            await respond(send, exc.status, error_body(exc.status, str(exc), exc.param))
            return
        raw = response.content
        status = response.status_code
        ok = status < 400
        if ok:
            self.ttft_s = time.perf_counter() - self.sent_at
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                self.usage = orjson.loads(raw).get("usage")
        self.close(error=None if ok else f"upstream {status}", ok=ok)
        await respond(send, status, raw, self._headers(b"application/json"))

    async def stream(self, send: Send) -> None:
        """The first chunk is read before the answer starts, so a replica that fails
        before it is replaced by another."""
        while True:
            try:
                response = await self._send(stream=True)
            except _Refused as exc:
                self.close(error=str(exc), ok=False)
                await respond(send, exc.status, error_body(exc.status, str(exc), exc.param))
                return
            if response.status_code >= 400:
                raw = await response.aread()
                await response.aclose()
                self.close(error=f"upstream {response.status_code}", ok=False)
                await respond(send, response.status_code, raw)
                return
            chunks = response.aiter_raw()
            try:
                first = await anext(chunks)
            except (httpx.TransportError, StopAsyncIteration) as exc:
                await response.aclose()
                assert self.routed is not None
                self._retry(self.routed, f"the stream ended before its first chunk: {exc!r}")
                continue
            except BaseException:  # the client left while the first token was awaited
                await response.aclose()
                raise
            break
        self.ttft_s = time.perf_counter() - self.sent_at
        assert self.routed is not None
        self.pool.first_token(self.routed)
        error: str | None = "client disconnected"
        tail = first[-4096:]
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self._headers(b"text/event-stream")})  # fmt: skip
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for piece in chunks:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                # the usage comes in the last events: keep only the stream's tail
                tail = (tail + piece)[-4096:]
            await send({"type": "http.response.body", "body": b""})
            error = None
        except httpx.TransportError as exc:
            error = f"the stream broke: {exc!r}"
            raise
        finally:
            await response.aclose()
            if error is None:
                self.usage = _usage_of_tail(tail)
            self.close(error=error, ok=error is None)

    def _headers(self, content_type: bytes) -> list[tuple[bytes, bytes]]:
        replica = self.routed.replica.name.encode() if self.routed is not None else b""
        return [(b"content-type", content_type), (b"x-treadle-replica", replica)]

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
        self.span.set("treadle.program_id", self.admitted.program_id)
        self.span.set("treadle.tenant", self.admitted.hints.tenant)
        self.span.set("gen_ai.usage.input_tokens", usage.get("prompt_tokens"))
        self.span.set("gen_ai.usage.output_tokens", usage.get("completion_tokens"))
        self.span.end(error)
        self.gw.metrics.finished(self.pool.served, ok, self.ttft_s)


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
