"""OpenAI-compatible HTTP front for simulated replicas (`treadle sim serve`).

Each replica (`realtime.SimReplica`) gets its own FastAPI app on its own port, like one
vLLM server per GPU; `serve` runs several in one process and one event loop.

Endpoints:

- `POST /v1/chat/completions` — OpenAI chat completions, non-streaming and streaming (SSE
  `data: {chunk}` lines in OpenAI's `chat.completion.chunk` format, then `data: [DONE]`;
  with `stream_options.include_usage` a last chunk carries `usage`). Tool calls come back
  in OpenAI's format (`tool_calls`, `finish_reason: "tool_calls"`). `usage` includes
  `prompt_tokens_details.cached_tokens` (the prefix-cache hit).
- `GET /v1/models`, `GET /health`.
- `GET /metrics` — Prometheus text with vLLM's names: `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a 0-1 fraction, as vLLM),
  `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total` (tokens),
  `vllm:num_preemptions_total`, `vllm:generation_tokens_total`,
  `vllm:request_success_total`; and the simulator's own `treadle_sim_pins_active`,
  `treadle_sim_pinned_blocks`, `treadle_sim_pins_set_total`,
  `treadle_sim_pins_released_total` (all reasons), `treadle_sim_pins_expired_total`,
  `treadle_sim_pins_refused_total`, `treadle_sim_recomputed_tokens_total`.
  Every sample is labelled `model_name`.
- `POST /v1/pins/release` with `{"program_id": "..."}` — release a program's pins now;
  answers `{"released": N}`.

Request extension fields (beyond OpenAI's), top level or inside vLLM's `vllm_xargs` dict
(top level wins); unknown fields are ignored:

- `priority` (int): lower runs first under the `priority` policy (vLLM's convention).
- `program_id` (str; `job_id`, the Continuum fork's name, is accepted too): the agent
  program this call belongs to (pins and the `program` policy).
- `pin_ttl_s` (float > 0): after this request finishes, keep its KV pinned for that long.
- `is_last_step` (bool): the program's last call: release its pins and set none.
- `request_id` (str; `rid`, SGLang's name, or the `X-Request-Id` header): the response
  `id` and the engine's request id; one still in flight is refused (400), as SGLang does.

Also honoured: `max_tokens` / `max_completion_tokens` (cuts the answer, `finish_reason:
"length"`), `response_format` (`json_schema` or `json_object`: the scripted content
validates against it), `tools`. `n` must be 1. Bad requests get a 4xx in OpenAI's error
shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or a
prompt that cannot fit, 404 for an unknown model.

Public API (stable): `create_app(replica, *, served_model_name=None) -> FastAPI`,
`build_replicas(n, *, profile, policy, rules, speed, model) -> list[SimReplica]`,
`async serve(replicas, host, port)`; rules files load with `realtime.load_rules`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle.backends.base import LLMRequest, Message, SchedulingHints, ToolCall
from treadle.backends.scripted import ScriptRule
from treadle.backends.sim.clock import RealTimeClock
from treadle.backends.sim.engine import EngineConfig, SchedulingPolicy
from treadle.backends.sim.profile import DEFAULT_PROFILE, Profile
from treadle.backends.sim.realtime import (
    DuplicateRequestId,
    SimCompletion,
    SimReplica,
    SimulatorFailure,
)
from treadle.errors import BackendError

_T = TypeVar("_T")

# -- request models ----------------------------------------------------------------------


class _FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class _ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: str = "function"
    function: _FunctionCall


class _MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[_ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "developer":  # OpenAI's newer name for the system role
            return "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"unknown role {role!r}")
        return role

    def to_message(self) -> Message:
        content = self.content
        if isinstance(content, list):
            # Content parts: only text parts exist for this simulator.
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        return Message.model_validate(
            {
                "role": self.role,
                "content": content,
                "tool_calls": [
                    ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                    for c in self.tool_calls or []
                ],
                "tool_call_id": self.tool_call_id,
                "name": self.name,
            }
        )


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat completion request this server reads (others ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_MessageIn] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    temperature: float | None = None
    n: int = Field(1, ge=1, le=1)
    priority: int | None = None
    program_id: str | None = None
    job_id: str | None = None
    pin_ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    is_last_step: bool | None = None
    request_id: str | None = None
    rid: str | None = None  # SGLang's name for it
    vllm_xargs: dict[str, Any] | None = None

    def hints(self) -> SchedulingHints:
        xargs = self.vllm_xargs or {}

        def pick(name: str, *aliases: str) -> Any:
            for key in (name, *aliases):
                value = getattr(self, key, None)
                if value is not None:
                    return value
            for key in (name, *aliases):
                if xargs.get(key) is not None:
                    return xargs[key]
            return None

        raw = {
            "priority": pick("priority"),
            "program_id": pick("program_id", "job_id"),
            "pin_ttl_s": pick("pin_ttl_s"),
            "is_last_step": pick("is_last_step"),
            "request_id": pick("request_id", "rid"),
        }
        hints = _HintsIn.model_validate({k: v for k, v in raw.items() if v is not None})
        return SchedulingHints(**hints.model_dump(exclude_none=True))

    def response_schema(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return {"type": "object"}
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be an object")
            return schema
        raise ValueError(f"unsupported response_format type {fmt.get('type')!r}")

    def to_llm_request(self) -> LLMRequest:
        return LLMRequest(
            model=self.model,
            messages=[m.to_message() for m in self.messages],
            tools=self.tools or [],
            response_schema=self.response_schema(),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            stream=self.stream,
            hints=self.hints(),
        )


class _HintsIn(BaseModel):
    """Extension fields, validated the same whether top level or in `vllm_xargs`."""

    model_config = ConfigDict(extra="forbid")

    priority: int | None = None
    program_id: str | None = None
    pin_ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    is_last_step: bool | None = None
    request_id: str | None = None


class _PinRelease(BaseModel):
    program_id: str


# -- errors --------------------------------------------------------------------------------


class _RequestError(BackendError):
    def __init__(self, status: int, message: str, *, kind: str, code: str, param: str | None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param


def _error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _bad(message: str, param: str | None = None) -> _RequestError:
    return _RequestError(
        400, message, kind="invalid_request_error", code="bad_request", param=param
    )


async def _admitted(answer: Awaitable[_T]) -> _T:
    """The replica's first answer to a request; its refusals as OpenAI-shaped errors."""
    try:
        return await answer
    except DuplicateRequestId as exc:
        raise _bad(str(exc), "rid") from exc
    except ValueError as exc:
        raise _bad(str(exc), "messages") from exc
    except SimulatorFailure as exc:
        raise _RequestError(
            500, str(exc), kind="server_error", code="simulator_failure", param=None
        ) from exc


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


# -- metrics -------------------------------------------------------------------------------


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time."""

    def __init__(self, replica: SimReplica, model: str):
        self.replica = replica
        self.model = model

    def collect(self) -> Iterator[Metric]:
        m = self.replica.engine.metrics()
        labels = ["model_name"]
        values = [self.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", m.running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", m.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", m.kv_usage)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix-cache queries, in tokens.",
            m.prefix_queries_tokens,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", m.prefix_hits_tokens
        )
        yield counter("vllm:num_preemptions", "Preemptions.", m.preemptions)
        yield counter("vllm:generation_tokens", "Generated tokens.", m.generation_tokens)
        yield counter("vllm:request_success", "Finished requests.", m.finished)
        yield gauge("treadle_sim_pins_active", "Pins held now.", m.pins_active)
        yield gauge("treadle_sim_pinned_blocks", "KV blocks held by pins.", m.pinned_blocks)
        yield counter("treadle_sim_pins_set", "Pins set.", m.pins_set)
        yield counter(
            "treadle_sim_pins_released", "Pins released, for any reason.", m.pins_released
        )
        yield counter(
            "treadle_sim_pins_expired", "Pins released at their deadline.", m.pins_expired
        )
        yield counter(
            "treadle_sim_pins_refused", "Pins refused (over the pinned limit).", m.pins_refused
        )
        yield counter(
            "treadle_sim_recomputed_tokens",
            "Tokens computed again after preemption.",
            m.recomputed_tokens,
        )


# -- the app -------------------------------------------------------------------------------


def _usage(done: SimCompletion) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def create_app(replica: SimReplica, *, served_model_name: str | None = None) -> FastAPI:
    """An OpenAI-compatible app for one replica (see the module docstring)."""
    model_name = served_model_name or replica.model
    app = FastAPI(title=f"treadle sim replica {replica.name}", docs_url=None, redoc_url=None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(replica, model_name))
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return _error(400, message, code="bad_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind=kind, code=str(exc.status_code))

    @app.exception_handler(_RequestError)
    async def _on_request_error(request: Request, exc: _RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, kind=exc.kind, code=exc.code, param=exc.param)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "replica": replica.name, "model": model_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "treadle-sim",
                    "max_model_len": replica.engine.profile.model.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/pins/release")
    async def release_pins(body: _PinRelease) -> dict[str, int]:
        return {"released": replica.engine.release_pins(body.program_id)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, http: Request) -> Response | dict[str, Any]:
        if body.model != model_name:
            raise _RequestError(
                404,
                f"The model `{body.model}` does not exist; this replica serves `{model_name}`.",
                kind="not_found_error",
                code="model_not_found",
                param="model",
            )
        try:
            request = body.to_llm_request()
        except (ValueError, ValidationError) as exc:
            raise _bad(str(exc)) from exc
        completion_id = (
            request.hints.request_id
            or http.headers.get("x-request-id")
            or f"chatcmpl-{uuid.uuid4().hex}"
        )
        request = request.model_copy(
            update={"hints": request.hints.model_copy(update={"request_id": completion_id})}
        )
        now = int(time.time())
        if not body.stream:
            done = await _admitted(replica.complete(request))
            message: dict[str, Any] = {"role": "assistant", "content": done.content}
            if done.tool_calls:
                message["tool_calls"] = [c.to_openai() for c in done.tool_calls]
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": now,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": done.finish_reason,
                    }
                ],
                "usage": _usage(done),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        items = replica.stream(request)
        first = await _admitted(anext(items))  # queues the request: a misfit is still a 400 here

        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": now,
            "model": model_name,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj: dict[str, Any] = {
                **head,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                item: str | SimCompletion = first
                while True:
                    if isinstance(item, str):
                        yield chunk({"content": item})
                    else:
                        if item.tool_calls:
                            calls = [
                                {"index": i, **c.to_openai()} for i, c in enumerate(item.tool_calls)
                            ]
                            yield chunk({"tool_calls": calls})
                        yield chunk({}, item.finish_reason)
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": _usage(item)})
                        break
                    item = await anext(items)
            except SimulatorFailure as exc:
                yield _sse({"error": {"message": str(exc), "type": "server_error"}})
            finally:
                await items.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# -- running replicas ----------------------------------------------------------------------


def build_replicas(
    n: int,
    *,
    profile: str | Profile = DEFAULT_PROFILE,
    policy: SchedulingPolicy = "fcfs",
    rules: list[ScriptRule] | None = None,
    speed: float = 1.0,
    model: str | None = None,
    config: EngineConfig | None = None,
) -> list[SimReplica]:
    """`n` replicas named sim-0..sim-(n-1) sharing one real-time clock."""
    if n < 1:
        raise ValueError("need at least one replica")
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    clock = RealTimeClock(speed)
    return [
        SimReplica.create(
            prof,
            policy=policy,
            rules=rules,
            name=f"sim-{i}",
            model=model,
            clock=clock,
            config=config,
        )
        for i in range(n)
    ]


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve` (several share a loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    replicas: list[SimReplica], host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve replica i on `port + i` until SIGINT/SIGTERM."""
    servers = [
        _Server(uvicorn.Config(create_app(r), host=host, port=port + i, log_level=log_level))
        for i, r in enumerate(replicas)
    ]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(s.serve() for s in servers))
