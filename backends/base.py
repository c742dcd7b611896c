"""The `Backend` protocol and the pydantic models every backend speaks.

A request carries OpenAI-style chat messages and tool definitions plus `SchedulingHints`:
what treadle's scheduler knows about the call (priority, program id, pin TTL, last step).
Each backend maps those hints onto its own server's fields, or ignores what it cannot use,
as declared by its `Capabilities`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

# defined with the other bases of the error tree; backends import it from here
from treadle.errors import BackendError as BackendError

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(BaseModel):
    """One function call requested by the model; `arguments` is the raw JSON text."""

    id: str
    name: str
    arguments: str = "{}"

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class Message(BaseModel):
    """One chat message in the OpenAI chat format."""

    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class SchedulingHints(BaseModel):
    """What the runtime knows about a call that a serving engine can use.

    `priority` follows treadle's convention: *lower runs first* (as vLLM). Dialects flip it
    for servers that run higher values first.
    """

    model_config = ConfigDict(frozen=True)

    priority: int = 0
    program_id: str | None = None
    request_id: str | None = None
    pin_ttl_s: float | None = None
    is_last_step: bool = False
    next_tool: str | None = None
    tenant: str | None = None
    #: LLM steps after this call on the program's longest path (0: its last LLM step)
    steps_to_execution: int | None = None
    #: predicted seconds of `next_tool` (what the program waits for after this call)
    tool_duration_s: float | None = None
    #: after this call the program waits for a person (unbounded: hold nothing for it)
    human_wait: bool = False


class LLMRequest(BaseModel):
    """A chat completion request as treadle issues it."""

    model: str
    messages: list[Message]
    tools: list[dict[str, Any]] = Field(default_factory=list)
    #: OpenAI's `tool_choice` as sent: "none", "auto", "required" or
    #: {"type": "function", "function": {"name": ...}}; None: the server's default ("auto"
    #: with tools, "none" without)
    tool_choice: str | dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False
    hints: SchedulingHints = Field(default_factory=SchedulingHints)
    #: extra HTTP headers for backends that speak HTTP (e.g. W3C `traceparent`)
    headers: dict[str, str] = Field(default_factory=dict)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LLMResponse(BaseModel):
    """A finished chat completion."""

    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = Field(default_factory=Usage)
    model: str | None = None
    #: the server's id of the completion (OpenAI's `id`), when it gave one
    id: str | None = None
    replica: str | None = None
    #: seconds from send to first token, when the backend measured it
    ttft_s: float | None = None


class StreamChunk(BaseModel):
    """An increment of a streamed response. The last chunk carries `finish_reason` and usage."""

    delta: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    id: str | None = None
    replica: str | None = None


class Capabilities(BaseModel):
    """What a backend can do with `SchedulingHints` and what it reports."""

    model_config = ConfigDict(frozen=True)

    streaming: bool = False
    tool_calls: bool = True
    prefix_cache: bool = False
    priority: bool = False
    pin_ttl: bool = False
    program_id: bool = False
    metrics: bool = False


class BackendTarget(BaseModel):
    """Who answers a backend's calls, in the terms of OpenTelemetry's GenAI conventions:
    `provider` (`gen_ai.provider.name`: "openai", "vllm", "sglang", ...), the `model` the
    requests go to (`gen_ai.request.model`; None when there is none, as for scripted
    answers), and the server (`server.address`, `server.port`)."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str | None = None
    server_address: str | None = None
    server_port: int | None = None


def target_of(backend: Backend) -> BackendTarget:
    """A backend's `target` (backends may define one), or a target named after its class."""
    target = getattr(backend, "target", None)
    if isinstance(target, BackendTarget):
        return target
    return BackendTarget(provider=type(backend).__name__)


@runtime_checkable
class Backend(Protocol):
    """Anything that answers chat requests."""

    @property
    def capabilities(self) -> Capabilities: ...

    async def generate(self, request: LLMRequest) -> LLMResponse: ...


@runtime_checkable
class ClosableBackend(Backend, Protocol):
    """A backend that holds resources (connection pools) to release."""

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]: ...


async def collect_stream(chunks: AsyncIterator[StreamChunk]) -> LLMResponse:
    """Fold a stream of chunks into one response; `ttft_s` is the time to the first text
    or tool call, measured here."""
    started = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    calls: list[ToolCall] = []
    finish = "stop"
    usage = Usage()
    model = replica = response_id = None
    async for chunk in chunks:
        if ttft is None and (chunk.delta or chunk.tool_calls):
            ttft = time.perf_counter() - started
        text.append(chunk.delta)
        calls.extend(chunk.tool_calls)
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
        model = chunk.model or model
        response_id = chunk.id or response_id
        replica = chunk.replica or replica
    return LLMResponse(
        content="".join(text) or None,
        tool_calls=calls,
        finish_reason=finish,
        usage=usage,
        model=model,
        id=response_id,
        replica=replica,
        ttft_s=ttft,
    )
