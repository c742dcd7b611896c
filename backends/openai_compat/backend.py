"""The `openai_compat` backend: chat completions from vLLM, SGLang, Continuum, treadle's
simulator, or any OpenAI-compatible server, over httpx.

The request is OpenAI's `/v1/chat/completions`; a `Dialect` (see `dialects.py`) adds the
fields through which the server receives treadle's scheduling hints. Answers come whole or
as Server-Sent Events; streamed tool calls arrive in pieces keyed by `index` and are
assembled here. Connection failures, 429 and 5xx are retried with exponential backoff;
anything else that is not a usable answer becomes a `BackendError` naming the server.
`metrics()` reads the server's Prometheus `/metrics` for the router.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from httpx_sse import EventSource, SSEError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from treadle.backends.base import (
    BackendError,
    BackendTarget,
    Capabilities,
    LLMRequest,
    LLMResponse,
    StreamChunk,
    ToolCall,
    Usage,
    collect_stream,
)
from treadle.backends.openai_compat.dialects import Dialect, make_dialect
from treadle.backends.openai_compat.server_metrics import (
    MetricsFormatError,
    ServerLoad,
    parse_server_load,
    windowed_hit_rate,
)

#: statuses worth another attempt: overload, and server faults that are not "never works"
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

HeaderHook = Callable[[LLMRequest], Mapping[str, str]]


class _TryAgain(BackendError):
    """A failure another try of the same request may not have (cannot connect, 429, 5xx);
    `retry_after` is the server's `Retry-After`, in seconds."""

    def __init__(self, failure: str, *, retry_after: float | None = None) -> None:
        super().__init__(failure, retryable=True)
        self.retry_after = retry_after


class OpenAICompatBackend:
    """One OpenAI-compatible server (one replica).

    `base_url` is the API base (`http://host:8000/v1`); without a trailing `/v1` it is taken
    as the server root and `/v1` is added. The wire `model` is this backend's `model`, not
    `LLMRequest.model` (the workflow's alias). Headers, later ones winning: `headers` (with
    every request), the dialect's hint headers, the `request_headers(request)` hook (e.g. to
    inject the current trace context), `LLMRequest.headers` (W3C `traceparent`/`tracestate`
    pass through untouched), and `extra_headers` given to one `generate`/`stream` call.
    `timeout_s` bounds each wait for bytes from the server (for a stream: the gap between
    chunks), `connect_timeout_s` the connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        dialect: str | Dialect = "vllm",
        dialect_options: Mapping[str, Any] | None = None,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        headers: Mapping[str, str] | None = None,
        request_headers: HeaderHook | None = None,
        client: httpx.AsyncClient | None = None,
        name: str | None = None,
        metrics_url: str | None = None,
        max_connections: int = 512,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeout_s and connect_timeout_s must be > 0")
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if base.endswith("/v1"):
            self.api_base, self.root_url = base, base[: -len("/v1")]
        else:
            self.api_base, self.root_url = base + "/v1", base
        self.model = model
        if isinstance(dialect, Dialect):
            if dialect_options:
                raise ValueError("dialect_options apply only when dialect is given by name")
            self.dialect = dialect
        else:
            self.dialect = make_dialect(dialect, **dict(dialect_options or {}))
        self.name = name or self.api_base
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._exponential = wait_exponential(multiplier=backoff_s, max=max_backoff_s)
        self.timeout_s = timeout_s
        self.metrics_url = metrics_url or self.root_url + "/metrics"
        self._chat_url = self.api_base + "/chat/completions"
        self._headers: dict[str, str] = dict(headers or {})
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._request_headers = request_headers
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        # Metrics and health checks are cheap: they must not wait as long as a generation.
        probe = min(timeout_s, max(connect_timeout_s, 5.0))
        self._probe_timeout = httpx.Timeout(probe, connect=connect_timeout_s)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        )
        self._last_load: ServerLoad | None = None
        url = httpx.URL(self.api_base)
        self.target = BackendTarget(
            provider=_PROVIDERS.get(self.dialect.name, self.dialect.name),
            model=model,
            server_address=url.host,
            server_port=url.port or (443 if url.scheme == "https" else 80),
        )

    def __repr__(self) -> str:
        return (
            f"OpenAICompatBackend({self.api_base!r}, {self.model!r}, dialect={self.dialect.name!r})"
        )

    @property
    def capabilities(self) -> Capabilities:
        return self.dialect.capabilities

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> OpenAICompatBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- request ---------------------------------------------------------------------

    def build_request(
        self,
        request: LLMRequest,
        *,
        stream: bool,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The JSON body and the headers this backend sends for `request`; `extra_body`
        (fields of this one send, e.g. llama.cpp's `id_slot`) is merged last."""
        dialect = self.dialect
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m.to_openai() for m in request.messages],
        }
        if request.tools:
            body["tools"] = request.tools
            body.update(dialect.tool_fields())
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.max_tokens is not None:
            body[dialect.max_tokens_field] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.response_schema is not None:
            body.update(dialect.structured_output(request.response_schema))
        body["stream"] = stream
        if stream and dialect.stream_usage:
            body["stream_options"] = {"include_usage": True}
        hints = request.hints
        if hints.request_id is not None:
            # A server refuses an id it still holds (SGLang: a duplicate rid), and a call
            # that is tried again (after a timeout, as the node's next attempt, in a run
            # resumed by another worker) may reach it while the first try still runs: every
            # send gets its own id, the call's id plus a random suffix.
            wire_id = f"{hints.request_id}.{uuid.uuid4().hex[:8]}"
            hints = hints.model_copy(update={"request_id": wire_id})
        hint_body, hint_headers = dialect.hint_fields(hints)
        body.update(hint_body)
        if extra_body:
            body.update(extra_body)
        headers = {**self._headers, **hint_headers}
        if self._request_headers is not None:
            headers.update(self._request_headers(request))
        headers.update(request.headers)
        if extra_headers:
            headers.update(extra_headers)
        return body, headers

    # -- generate --------------------------------------------------------------------

    async def generate(
        self,
        request: LLMRequest,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> LLMResponse:
        """A whole answer. With `request.stream` the answer is streamed and folded, which
        also measures the time to first token (`ttft_s`)."""
        if request.stream:
            timing = _Timing()
            folded = await collect_stream(self._stream(request, extra_headers, timing, extra_body))
            return folded.model_copy(
                update={
                    "model": timing.model or self.model,
                    "replica": self.name,
                    "ttft_s": timing.ttft_s,
                }
            )
        body, headers = self.build_request(
            request, stream=False, extra_headers=extra_headers, extra_body=extra_body
        )
        response = await self._send(body, headers, stream=False)
        return self._parse_completion(self._json(response))

    async def stream(
        self,
        request: LLMRequest,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Text as it is generated; the last chunk carries the tool calls (assembled),
        the finish reason and the usage."""
        async for chunk in self._stream(request, extra_headers, _Timing(), extra_body):
            yield chunk

    async def _stream(
        self,
        request: LLMRequest,
        extra_headers: Mapping[str, str] | None,
        timing: _Timing,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        body, headers = self.build_request(
            request, stream=True, extra_headers=extra_headers, extra_body=extra_body
        )
        timing.start = time.perf_counter()
        response = await self._send(body, headers, stream=True)
        calls = ToolCallAccumulator(self.name)
        finish: str | None = None
        usage: Usage | None = None
        done = False
        try:
            async for sse in EventSource(response).aiter_sse():
                data = sse.data
                if not data:
                    continue  # an event without data (only `id:` or `event:` fields)
                if data.strip() == "[DONE]":
                    done = True
                    break
                event = self._event_json(data)
                if "error" in event and not event.get("choices"):
                    raise BackendError(
                        f"{self.name} reported an error mid-stream: {_error_text(event)}",
                        retryable=True,
                        replica=self.name,
                    )
                timing.model = timing.model or _str_or_none(event.get("model"))
                timing.response_id = timing.response_id or _str_or_none(event.get("id"))
                if event.get("usage"):
                    usage = _parse_usage(event["usage"], self.name)
                for choice in event.get("choices") or []:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue  # n > 1 is never requested; ignore stray choices
                    delta = choice.get("delta") or {}
                    if not isinstance(delta, dict):
                        raise self._garbage(f"a chunk whose delta is not an object: {data[:200]}")
                    for piece in delta.get("tool_calls") or []:
                        timing.first_token()
                        calls.add_delta(piece)
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        timing.first_token()
                        yield StreamChunk(delta=content)
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
        except SSEError as exc:  # e.g. not text/event-stream: a proxy's page, not the model
            raise self._garbage(f"a stream that is not Server-Sent Events: {exc}") from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"{self.name}: the stream broke: {exc!r}", retryable=True, replica=self.name
            ) from exc
        finally:
            await response.aclose()
        if not done and finish is None:
            raise BackendError(
                f"{self.name}: the stream ended before the answer finished",
                retryable=True,
                replica=self.name,
            )
        self._refuse_truncated_call(finish, calls)
        tool_calls = calls.calls()
        yield StreamChunk(
            tool_calls=tool_calls,
            finish_reason=finish or ("tool_calls" if tool_calls else "stop"),
            usage=usage or Usage(),
            model=timing.model or self.model,
            id=timing.response_id,
        )

    # -- server state ----------------------------------------------------------------

    async def metrics(self) -> ServerLoad:
        """The server's load from its Prometheus metrics. `prefix_hit_rate` covers the time
        since this backend's previous scrape where the server exports counters."""
        names = self.dialect.metric_names
        if names is None:
            raise BackendError(
                f"{self.name}: the {self.dialect.name!r} dialect exports no load metrics",
                replica=self.name,
            )
        try:
            response = await self._client.get(
                self.metrics_url, headers=self._headers, timeout=self._probe_timeout
            )
        except httpx.HTTPError as exc:
            raise BackendError(
                f"{self.name}: cannot read {self.metrics_url}: {exc!r}",
                retryable=True,
                replica=self.name,
            ) from exc
        if response.status_code != 200:
            hint = " (SGLang exports metrics only with --enable-metrics)"
            raise BackendError(
                f"{self.name}: GET {self.metrics_url} answered {response.status_code}"
                + (hint if self.dialect.name == "sglang" else ""),
                retryable=response.status_code in _RETRY_STATUS,
                replica=self.name,
            )
        try:
            load = parse_server_load(response.text, names)
        except MetricsFormatError as exc:
            raise BackendError(
                f"{self.name}: {self.metrics_url}: {exc}", replica=self.name
            ) from exc
        rate = windowed_hit_rate(self._last_load, load)
        self._last_load = load
        return load.model_copy(update={"prefix_hit_rate": rate})

    async def health(self) -> bool:
        """Whether the server answers its health check now; never raises."""
        try:
            response = await self._client.get(
                self.root_url + self.dialect.health_path,
                headers=self._headers,
                timeout=self._probe_timeout,
            )
        except httpx.HTTPError:
            return False
        return response.is_success

    # -- transport -------------------------------------------------------------------

    async def _send(
        self, body: dict[str, Any], headers: dict[str, str], *, stream: bool
    ) -> httpx.Response:
        """POST the chat request; retry what may pass on a second try (cannot connect, 429,
        5xx) with jittered exponential backoff that honours `Retry-After`. A returned
        response has a 2xx status (and, with `stream`, an unread body the caller must
        close)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_TryAgain),
            stop=stop_after_attempt(self.retries + 1),
            wait=self._backoff,
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            return await retrying(self._send_once, body, headers, stream=stream)
        except _TryAgain as exc:
            raise BackendError(
                f"{self.name} {exc} (gave up after {self.retries + 1} attempts)",
                retryable=True,
                replica=self.name,
            ) from None

    def _backoff(self, state: RetryCallState) -> float:
        delay = self._exponential(state)
        delay *= 0.5 + random.random() / 2  # jitter: replicas' clients must not sync up
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _TryAgain) and failure.retry_after is not None:
            delay = min(max(delay, failure.retry_after), self.max_backoff_s)
        return delay

    async def _send_once(
        self, body: dict[str, Any], headers: dict[str, str], *, stream: bool
    ) -> httpx.Response:
        """One POST: the response if it is a success; `_TryAgain` for what another try may
        fix; a `BackendError` for the rest."""
        try:
            req = self._client.build_request(
                "POST", self._chat_url, json=body, headers=headers, timeout=self._timeout
            )
            response = await self._client.send(req, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _TryAgain(f"cannot connect ({type(exc).__name__}: {exc})") from exc
        except httpx.TimeoutException as exc:
            # The server took the request and went quiet. Waiting as long again here
            # would only double the delay: the caller (or the pool) decides.
            raise BackendError(
                f"{self.name}: no answer within {self.timeout_s:g} s",
                retryable=True,
                replica=self.name,
            ) from exc
        except httpx.HTTPError as exc:
            raise _TryAgain(f"connection failed ({type(exc).__name__}: {exc})") from exc
        if response.is_success:
            return response
        raw = await response.aread()
        await response.aclose()
        detail = _error_detail(raw)
        if response.status_code not in _RETRY_STATUS:
            raise BackendError(
                f"{self.name} refused the request ({response.status_code}): {detail}",
                retryable=False,
                replica=self.name,
            )
        raise _TryAgain(
            f"answered {response.status_code}: {detail}",
            retry_after=_retry_after(response.headers.get("retry-after")),
        )

    # -- parsing ---------------------------------------------------------------------

    def _garbage(self, what: str) -> BackendError:
        # A malformed answer is the server's fault, not the request's: another attempt
        # (or another replica) may well succeed.
        return BackendError(f"{self.name} returned {what}", retryable=True, replica=self.name)

    def _refuse_truncated_call(self, finish: Any, calls: ToolCallAccumulator) -> None:
        # A tool call cut at max_tokens is never safe to run, and some servers (llama.cpp)
        # answer 500 when it is sent back: the request must be asked again with more room.
        if finish == "length" and calls:
            raise BackendError(
                f"{self.name}: the answer reached max_tokens in the middle of a tool call",
                retryable=False,
                replica=self.name,
            )

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise self._garbage(f"a body that is not JSON: {response.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise self._garbage(f"JSON that is not an object: {response.text[:200]!r}")
        return data

    def _event_json(self, data: str) -> dict[str, Any]:
        try:
            event = json.loads(data)
        except ValueError:
            raise self._garbage(f"a stream event that is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise self._garbage(f"a stream event that is not an object: {data[:200]!r}")
        return event

    def _parse_completion(self, data: dict[str, Any]) -> LLMResponse:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            if "error" in data:
                raise self._garbage(f"an error: {_error_text(data)}")
            raise self._garbage(f"no choices: {json.dumps(data)[:200]}")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise self._garbage(f"a choice without a message: {json.dumps(choice)[:200]}")
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise self._garbage(f"message content of type {type(content).__name__}")
        calls = ToolCallAccumulator(self.name)
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise self._garbage(f"tool_calls that are not a list: {raw_calls!r:.200}")
        for i, raw in enumerate(raw_calls):
            if not isinstance(raw, dict):
                raise self._garbage(f"a tool call that is not an object: {raw!r:.200}")
            calls.add_delta({**raw, "index": i})
        self._refuse_truncated_call(choice.get("finish_reason"), calls)
        tool_calls = calls.calls()
        finish = choice.get("finish_reason") or ("tool_calls" if tool_calls else "stop")
        return LLMResponse(
            content=content,
            tool_calls=tool_calls,
            finish_reason=str(finish),
            usage=_parse_usage(data.get("usage"), self.name),
            model=_str_or_none(data.get("model")) or self.model,
            id=_str_or_none(data.get("id")),
            replica=self.name,
        )


#: `gen_ai.provider.name` of a dialect's server (others: the dialect's name)
_PROVIDERS = {"continuum": "vllm", "llamacpp": "llama.cpp", "sim": "treadle.sim"}


@dataclass
class _Timing:
    start: float = 0.0
    ttft_s: float | None = None
    model: str | None = None
    response_id: str | None = None

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start


@dataclass
class _PartialCall:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAccumulator:
    """Assembles tool calls from OpenAI-format deltas.

    A streamed call arrives in pieces that share an `index`: the first usually carries `id`
    and `function.name`, later ones append to `function.arguments`. Servers that omit `index`
    are handled by `id` (a new id starts a new call; none continues the last one).
    `source` names the server in errors.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._calls: dict[int, _PartialCall] = {}
        self._last: int | None = None

    def add(
        self,
        index: int | None,
        id: str | None = None,
        name: str | None = None,
        arguments: str | dict[str, Any] | None = None,
    ) -> None:
        if index is None:
            known = [i for i, c in self._calls.items() if id is not None and c.id == id]
            if known:
                index = known[0]
            elif id is not None or self._last is None:
                index = max(self._calls, default=-1) + 1
            else:
                index = self._last
        call = self._calls.setdefault(index, _PartialCall())
        self._last = index
        if id:
            call.id = id
        if name and name != call.name:
            # Names come whole in the first piece in practice; some servers repeat them on
            # every piece, and a split name is joined.
            call.name += name
        if isinstance(arguments, dict):  # some servers send the parsed object
            call.arguments = [json.dumps(arguments)]
        elif arguments:
            call.arguments.append(arguments)

    def add_delta(self, delta: Any) -> None:
        """Add one OpenAI tool-call (delta) object: `{index, id, function: {name, arguments}}`."""
        if not isinstance(delta, dict):
            raise BackendError(f"{self.source} returned a tool call that is not an object")
        function = delta.get("function") or {}
        if not isinstance(function, dict):
            raise BackendError(
                f"{self.source} returned a tool call whose function is not an object"
            )
        index = delta.get("index")
        self.add(
            index if isinstance(index, int) else None,
            id=_str_or_none(delta.get("id")),
            name=_str_or_none(function.get("name")),
            arguments=function.get("arguments"),
        )

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self) -> list[ToolCall]:
        """The assembled calls in index order; `BackendError` if one is not usable."""
        out: list[ToolCall] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.name:
                raise BackendError(
                    f"{self.source} returned a tool call without a function name",
                    retryable=True,
                )
            arguments = "".join(call.arguments).strip() or "{}"
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                # The model's output, not a transport fault: the same request tends to
                # produce it again, so the caller decides whether to re-ask.
                raise BackendError(
                    f"{self.source} returned invalid JSON arguments for tool call "
                    f"{call.name!r}: {arguments[:200]!r}",
                    retryable=False,
                )
            out.append(
                ToolCall(
                    id=call.id or f"call_{uuid.uuid4().hex[:24]}",
                    name=call.name,
                    arguments=arguments,
                )
            )
        return out


def _parse_usage(raw: Any, source: str) -> Usage:
    if raw is None:
        return Usage()
    if not isinstance(raw, dict):
        raise BackendError(f"{source} returned usage that is not an object: {raw!r:.200}")
    details = raw.get("prompt_tokens_details") or {}
    try:
        return Usage(
            prompt_tokens=int(raw.get("prompt_tokens") or 0),
            completion_tokens=int(raw.get("completion_tokens") or 0),
            cached_prompt_tokens=int(details.get("cached_tokens") or 0)
            if isinstance(details, dict)
            else 0,
        )
    except (TypeError, ValueError) as exc:
        raise BackendError(f"{source} returned malformed usage {raw!r:.200}: {exc}") from exc


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _error_text(data: dict[str, Any]) -> str:
    error = data.get("error", data)
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:300]
    return str(error)[:300]


def _error_detail(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(data, dict):
        if "detail" in data and "error" not in data:  # FastAPI's shape
            return str(data["detail"])[:300]
        return _error_text(data)
    return text[:300]


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from model servers, and backoff covers it
