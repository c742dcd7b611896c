"""OpenAI-compatible HTTP front for simulated replicas (`treadle sim serve`).

Each replica (`realtime.SimReplica`) gets its own FastAPI app on its own port, like one
vLLM server per GPU; `serve` runs several in one process and one event loop.

Endpoints:

- `POST /v1/chat/completions` — OpenAI chat completions, non-streaming and streaming (SSE
  `data: {chunk}` lines in OpenAI's `chat.completion.chunk` format, then `data: [DONE]`;
  with `stream_options.include_usage` a last chunk carries `usage`). Tool calls come back
  in OpenAI's format (`tool_calls`, `finish_reason: "tool_calls"`). `usage` includes
  `prompt_tokens_details.cached_tokens` (the prefix-cache hit). A client that disconnects
  aborts its request in the engine, streamed or not (vLLM's `with_cancellation`).
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

Also honoured, as vLLM's OpenAI server does (checked against its `ChatCompletionRequest`
validators and serving code):

- `max_tokens` / `max_completion_tokens` (cuts the answer, `finish_reason: "length"`);
  over `max_model_len`, or with the prompt over the context, a 400 in vLLM's words.
- `response_format` (`json_schema` or `json_object`: the scripted content validates).
- `tools` (functions; anything else is a 400, as is `tools: []`) and `tool_choice`:
  "none" (no tool calls, whatever the script says), "auto" (the default with tools: the
  script's calls), "required" (a call is forced: the script's, or one to the first tool
  with arguments generated from its parameters; `finish_reason: "tool_calls"`) and a named
  function (a call to it; `finish_reason: "stop"`, as OpenAI and vLLM). A `tool_choice`
  without `tools`, or naming no tool of them, is a 400.
- `logprobs` / `top_logprobs` (at most 20, vLLM's default `--max-logprobs`): made-up but
  well-formed, deterministic values for every content token, streamed with their delta.
- `stream_options` only with `stream: true`; `n` must be 1.

Bad requests get a 4xx in vLLM's error shape, `{"error": {"message", "type", "param",
"code"}}` (`type` "BadRequestError" / "NotFoundError", `code` the status): 400 for a
malformed body, a refused field or a prompt that cannot fit, 404 for an unknown model.

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
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle.backends.base import LLMRequest, Message, SchedulingHints, ToolCall
from treadle.backends.scripted import ScriptRule
from treadle.backends.sim.clock import RealTimeClock
from treadle.backends.sim.engine import EngineConfig, SchedulingPolicy
from treadle.backends.sim.profile import DEFAULT_PROFILE, Profile
from treadle.backends.sim.realtime import (
    ContextLengthExceeded,
    DuplicateRequestId,
    SimCompletion,
    SimReplica,
    SimulatorFailure,
)
from treadle.backends.sim.tokenizer import VOCAB_SIZE, tokenize_with_offsets
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


class _FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _ToolIn(BaseModel):
    """A tool as vLLM takes it: a function (`type` may be left out)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: _FunctionDef


class _Refused(BackendError, ValueError):
    """A request vLLM refuses with 400, in its words; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param: str | None = param


#: vLLM's default `--max-logprobs`
MAX_LOGPROBS = 20


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat completion request this server reads (others ignored),
    checked as vLLM checks them (`_check_as_vllm`)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_MessageIn] = Field(min_length=1)
    tools: list[_ToolIn] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
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
    #: vLLM's: prompts share cached blocks only with prompts of the same salt
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _check_as_vllm(cls, data: Any) -> Any:
        """The 400s of vLLM's `ChatCompletionRequest` validators (`check_tool_usage`,
        `check_logprobs`, `validate_stream_options`), with their messages."""
        if not isinstance(data, dict):
            return data
        if data.get("stream_options") and not data.get("stream"):
            raise _Refused(
                "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        top = data.get("top_logprobs")
        if top is not None:
            if not isinstance(top, int) or isinstance(top, bool):
                raise _Refused("`top_logprobs` must be an integer.", "top_logprobs")
            if top < 0 and top != -1:
                raise _Refused("`top_logprobs` must be a positive value or -1.", "top_logprobs")
            if (top == -1 or top > 0) and not data.get("logprobs"):
                raise _Refused(
                    "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
                )
            wanted = VOCAB_SIZE if top == -1 else top
            if wanted > MAX_LOGPROBS:
                raise _Refused(
                    f"Requested sample logprobs of {wanted}, which is greater than max "
                    f"allowed: {MAX_LOGPROBS}",
                    "top_logprobs",
                )
        tools = data.get("tools")
        if tools == []:
            raise _Refused(
                "`tools` must not be an empty array. Either provide at least one tool or "
                "omit the field entirely.",
                "tools",
            )
        choice = data.get("tool_choice")
        if choice is None or choice == "none":
            return data
        if not tools:
            raise _Refused("When using `tool_choice`, `tools` must be set.", "tool_choice")
        if not isinstance(choice, dict):
            if choice not in ("auto", "required"):
                raise _Refused(
                    f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", '
                    '"auto" or "required" are supported.',
                    "tool_choice",
                )
            return data
        usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
        function = choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _Refused(
                f"Invalid value for `function` in `tool_choice`! {usage}", "tool_choice.function"
            )
        names = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
        if function["name"] not in names:
            raise _Refused(
                "The tool specified in `tool_choice` does not match any of the specified `tools`",
                "tool_choice",
            )
        return data

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
            tools=[t.model_dump(exclude_none=True) for t in self.tools or []],
            tool_choice=self.tool_choice,
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
    def __init__(self, status: int, message: str, *, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


#: vLLM's error `type` by status
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


def _error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error shape: `{"error": {"message", "type", "param", "code"}}`, `code` the
    HTTP status (the OpenAI clients read the message whatever the shape)."""
    kind = _ERROR_TYPES.get(status, "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param), status_code=status)


def _bad(message: str, param: str | None = None) -> _RequestError:
    return _RequestError(400, message, param=param)


async def _admitted(answer: Awaitable[_T]) -> _T:
    """The replica's first answer to a request; its refusals as OpenAI-shaped errors."""
    try:
        return await answer
    except DuplicateRequestId as exc:
        raise _bad(str(exc), "rid") from exc
    except ContextLengthExceeded as exc:
        raise _bad(str(exc), "input_tokens") from exc
    except ValueError as exc:
        raise _bad(str(exc), "messages") from exc
    except SimulatorFailure as exc:
        raise _RequestError(500, str(exc)) from exc


async def _cancelled_on_disconnect(http: Request, answer: Awaitable[_T]) -> _T:
    """`answer`, cancelled (and the request aborted in the engine) if the client
    disconnects first, as vLLM's `with_cancellation` does for non-streamed requests."""
    task = asyncio.ensure_future(answer)

    async def watch() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            # nobody reads it: nginx's "client closed request"
            raise _RequestError(499, "the client disconnected") from None
        raise
    finally:
        watcher.cancel()


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in errors:
        refused = (err.get("ctx") or {}).get("error")
        if isinstance(refused, _Refused):  # vLLM's own words, and the field they are about
            parts.append(str(refused))
            param = param or refused.param
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


def _logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """`logprobs.content` for the tokens of `text`: made up but well formed and
    deterministic (the simulator has no distribution): each token's logprob in (-1.5, 0],
    and `top` alternatives, the sampled token first, in falling order."""
    ids, ends = tokenize_with_offsets(text)
    out: list[dict[str, Any]] = []
    start = 0
    for token_id, end in zip(ids, ends, strict=True):
        token = text[start:end]
        start = end
        logprob = -round((token_id % 1000) / 1000 * 1.5, 4)
        ranked = [_logprob_entry(token, logprob)]
        k = 0
        while len(ranked) < top:
            other = _ALTERNATIVES[(token_id + k) % len(_ALTERNATIVES)]
            k += 1
            if other != token:
                ranked.append(_logprob_entry(other, round(logprob - 1.0 - 0.5 * k, 4)))
        out.append({**ranked[0], "top_logprobs": ranked[:top] if top else []})
    return out


def _logprob_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


#: the tokens the made-up alternatives of `_logprobs` are drawn from
_ALTERNATIVES = (" the", " a", ",", ".", " and", " of", " to", " in", " is", " that", "\n")


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
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(_RequestError)
    async def _on_request_error(request: Request, exc: _RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

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
            raise _RequestError(404, f"The model `{body.model}` does not exist.", param="model")
        context = replica.engine.profile.model.max_model_len
        for name in ("max_completion_tokens", "max_tokens"):
            asked = getattr(body, name)
            if asked is not None and asked > context:
                raise _bad(
                    f"{name}={asked} cannot be greater than max_model_len={context}. Please "
                    "request fewer output tokens.",
                    name,
                )
        try:
            request = body.to_llm_request()
        except (ValueError, ValidationError) as exc:
            raise _bad(str(exc)) from exc
        top = (body.top_logprobs or 0) if body.logprobs else None
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
            done = await _cancelled_on_disconnect(
                http, _admitted(replica.complete(request, cache_salt=body.cache_salt))
            )
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
                        "logprobs": None
                        if top is None
                        else {"content": _logprobs(done.content or "", top)},
                        "finish_reason": done.finish_reason,
                    }
                ],
                "usage": _usage(done),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        items = replica.stream(request, cache_salt=body.cache_salt)
        first = await _admitted(anext(items))  # queues the request: a misfit is still a 400 here

        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": now,
            "model": model_name,
        }

        def chunk(
            delta: dict[str, Any],
            finish: str | None = None,
            logprobs: list[dict[str, Any]] | None = None,
        ) -> bytes:
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish,
            }
            obj: dict[str, Any] = {**head, "choices": [choice]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        async def events() -> AsyncIterator[bytes]:
            text = ""  # the content so far: each delta ends where a token does
            try:
                yield chunk({"role": "assistant", "content": ""})
                item: str | SimCompletion = first
                while True:
                    if isinstance(item, str):
                        tokens = None
                        if top is not None:
                            tokens = _logprobs(text + item, top)[len(_logprobs(text, 0)) :]
                        text += item
                        yield chunk({"content": item}, logprobs=tokens)
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
                yield _sse(_error_body(500, str(exc)))
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
