"""Typed run events. Every state change of a run is one event with a sequence number.

Events are small slotted dataclasses (they are created on the orchestrator's hot path) and
turn into plain dicts for stores, streams and traces with `to_dict` / `event_from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(slots=True)
class Event:
    seq: int
    run_id: str
    ts: float
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _field_names(type(self))}
        out["kind"] = self.kind
        return out


@dataclass(slots=True)
class RunStarted(Event):
    graph: str
    resumed: bool = False
    kind: ClassVar[str] = "run_started"


@dataclass(slots=True)
class NodeReady(Event):
    node: str
    kind: ClassVar[str] = "node_ready"


@dataclass(slots=True)
class NodeStarted(Event):
    node: str
    attempt: int = 1
    kind: ClassVar[str] = "node_started"


@dataclass(slots=True)
class NodeRetrying(Event):
    node: str
    attempt: int
    error: str
    delay_s: float
    kind: ClassVar[str] = "node_retrying"


@dataclass(slots=True)
class NodeFinished(Event):
    node: str
    duration_s: float
    kind: ClassVar[str] = "node_finished"


@dataclass(slots=True)
class NodeFailed(Event):
    node: str
    error: str
    attempt: int = 1
    policy: str = "fail"
    kind: ClassVar[str] = "node_failed"


@dataclass(slots=True)
class NodeSkipped(Event):
    node: str
    reason: str
    kind: ClassVar[str] = "node_skipped"


@dataclass(slots=True)
class GraphExtended(Event):
    """A node added instances to the run's DAG (a map's elements, a planner's tasks)."""

    node: str
    instances: list[str]
    kind: ClassVar[str] = "graph_extended"


@dataclass(slots=True)
class LLMCallQueued(Event):
    node: str
    call_id: str
    #: the model alias of the workflow
    model: str
    prompt_tokens: int = 0
    #: the model the request goes to, its provider and server (the backend's `target`)
    request_model: str | None = None
    provider: str | None = None
    server_address: str | None = None
    server_port: int | None = None
    #: the request's limits, as sent
    max_tokens: int | None = None
    temperature: float | None = None
    kind: ClassVar[str] = "llm_call_queued"


@dataclass(slots=True)
class LLMCallDispatched(Event):
    node: str
    call_id: str
    replica: str | None = None
    priority: int = 0
    queue_wait_s: float = 0.0
    kind: ClassVar[str] = "llm_call_dispatched"


@dataclass(slots=True)
class LLMTokens(Event):
    node: str
    call_id: str
    text: str
    kind: ClassVar[str] = "llm_tokens"


@dataclass(slots=True)
class LLMCallFinished(Event):
    node: str
    call_id: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    duration_s: float = 0.0
    ttft_s: float | None = None
    tool_calls: int = 0
    replica: str | None = None
    error: str | None = None
    #: why the model stopped ("stop", "length", "tool_calls", ...), when it answered
    finish_reason: str | None = None
    #: the model that answered and the server's id of the completion, when it said
    response_model: str | None = None
    response_id: str | None = None
    kind: ClassVar[str] = "llm_call_finished"


@dataclass(slots=True)
class ToolCallStarted(Event):
    node: str
    call_id: str
    tool: str
    kind: ClassVar[str] = "tool_call_started"


@dataclass(slots=True)
class ToolCallFinished(Event):
    node: str
    call_id: str
    tool: str
    duration_s: float
    ok: bool = True
    error: str | None = None
    kind: ClassVar[str] = "tool_call_finished"


@dataclass(slots=True)
class PinSet(Event):
    node: str
    call_id: str
    ttl_s: float
    tokens: int = 0
    kind: ClassVar[str] = "pin_set"


@dataclass(slots=True)
class PinReleased(Event):
    node: str
    call_id: str
    #: next_call, no_tool_call, expired, replaced, pressure, tool_estimate, run_finished,
    #: cancelled, interrupted or waiting (the run parked for human input)
    reason: str
    used: bool = False
    kind: ClassVar[str] = "pin_released"


@dataclass(slots=True)
class InputRequested(Event):
    """An `ask` node asks a person (first time only; `RunRecord.pending_inputs` lists the
    requests a waiting run has open). The fields are `InputRequest`'s."""

    node: str
    prompt: str
    answer_schema: dict[str, Any] = dataclasses.field(default_factory=dict)
    has_default: bool = False
    default: Any = None
    expires_at: float | None = None
    kind: ClassVar[str] = "input_requested"


@dataclass(slots=True)
class InputReceived(Event):
    """An `ask` node got its answer: from a person (`key`: the client's idempotency key),
    or its default once the request expired (`defaulted`)."""

    node: str
    key: str | None = None
    defaulted: bool = False
    kind: ClassVar[str] = "input_received"


@dataclass(slots=True)
class RunWaiting(Event):
    """The run is parked until a person answers: `nodes` are the `ask` instances it waits
    on. It holds no task, scheduler slot or KV pin until it is resumed (`RunStarted` with
    `resumed`)."""

    nodes: list[str]
    kind: ClassVar[str] = "run_waiting"


@dataclass(slots=True)
class CacheHit(Event):
    """A node's output (or, with `call_id`, one LLM call's answer) came from the result
    cache: nothing ran, and `saved_tokens` tokens were not spent."""

    node: str
    key: str
    call_id: str | None = None
    saved_tokens: int = 0
    kind: ClassVar[str] = "cache_hit"


@dataclass(slots=True)
class RunFinished(Event):
    status: str  # "succeeded" | "failed" | "cancelled"
    error: str | None = None
    duration_s: float = 0.0
    kind: ClassVar[str] = "run_finished"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RunStarted,
        NodeReady,
        NodeStarted,
        NodeRetrying,
        NodeFinished,
        NodeFailed,
        NodeSkipped,
        GraphExtended,
        LLMCallQueued,
        LLMCallDispatched,
        LLMTokens,
        LLMCallFinished,
        ToolCallStarted,
        ToolCallFinished,
        PinSet,
        PinReleased,
        InputRequested,
        InputReceived,
        RunWaiting,
        CacheHit,
        RunFinished,
    )
}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from `Event.to_dict` output.

    Fields this version does not know are dropped, so a journal written by a newer treadle
    stays readable by an older one during a rolling upgrade; an unknown kind is an error.
    """
    kind = data["kind"]
    try:
        cls = EVENT_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown event kind {kind!r}") from None
    return cls(**{name: data[name] for name in _field_names(cls) if name in data})


_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}


def _field_names(cls: type[Event]) -> tuple[str, ...]:
    """The dataclass fields of an event class, looked up once (`dataclasses.fields` is slow,
    and this runs for every event a durable store writes or reads)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names
