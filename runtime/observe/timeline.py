"""The timeline of one run, folded from its event journal (the data behind `treadle trace`).

Any store's `read_events(run_id)` gives what `build_timeline` needs. The timeline has one
row per node instance (map elements, subgraph nodes and planner tasks nested under the node
that holds them), per LLM call (split into queue / prefill / decode where the time to first
token is known), per tool call and per KV pin. Times are seconds from the run's first event.
`Timeline.to_dict()` is the `--json` form; `treadle.cli.trace_view` draws it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from treadle.runtime.core.events import (
    Event,
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
    LLMTokens,
    NodeFailed,
    NodeFinished,
    NodeReady,
    NodeRetrying,
    NodeSkipped,
    NodeStarted,
    PinReleased,
    PinSet,
    RunFinished,
    RunStarted,
    ToolCallFinished,
    ToolCallStarted,
)
from treadle.runtime.observe.metrics import RunSummary, summarize_run

#: error policies after whose `NodeFailed` the orchestrator still settles the node: `skip`
#: emits `NodeSkipped`, `fallback` and `handler` emit `NodeFinished` (with the fallback
#: value, or the handler's output); after `fail` (or a planner task's `observe`) nothing
#: more comes for the node
SETTLED_LATER = frozenset({"skip", "fallback", "handler"})

#: segment kinds, in the order a legend lists them
SEGMENT_KINDS = (
    "wait",  # node ready, waiting for a concurrency slot
    "attempt",  # a node attempt that succeeded (or is still running)
    "failed",  # a node attempt that failed
    "backoff",  # between a failed attempt and the next one
    "queue",  # an LLM call held by treadle's scheduler
    "prefill",  # sent, until the first token
    "decode",  # first token to the answer
    "call",  # an LLM call whose prefill/decode split is unknown
    "tool",  # a tool call
    "error",  # an LLM or tool call that failed
    "pin",  # a KV-cache pin held
)


def parent_instance(instance: str) -> str | None:
    """The node instance that contains `instance`: `m[3]` → `m`, `sub/x` → `sub`,
    `planner/task2` → `planner`, `sub/m[0]` → `sub/m`, `m[0]/x` → `m[0]`; None at the top."""
    if instance.endswith("]"):
        i = instance.rfind("[")
        if i > 0:
            return instance[:i]
    j = instance.rfind("/")
    if j > 0:
        return instance[:j]
    return None


@dataclass
class Segment:
    kind: str
    start_s: float
    end_s: float


@dataclass
class Row:
    """One bar of the waterfall."""

    #: node instance id, LLM / tool call id, or `pin:<call id>`
    id: str
    kind: str  # "node" | "llm" | "tool" | "pin"
    label: str
    #: the node instance this row belongs to (None for top-level nodes)
    parent: str | None
    start_s: float
    #: None while still open when the journal ends (a running or interrupted run)
    end_s: float | None = None
    #: node: running, done, failed, skipped, fallback; call: running, ok, error;
    #: pin: held, released
    status: str = "running"
    attempts: int = 1
    depth: int = 0
    segments: list[Segment] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s


@dataclass
class Marker:
    """A run-level instant: started, resumed, finished."""

    kind: str
    at_s: float
    detail: str = ""


@dataclass
class Timeline:
    run_id: str
    graph: str | None
    #: the final status, or None when the journal has no RunFinished (yet)
    status: str | None
    error: str | None
    #: wall-clock time (epoch seconds) of the first event; row times are relative to it
    started_at: float
    duration_s: float
    rows: list[Row]
    markers: list[Marker]
    summary: RunSummary

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "graph": self.graph,
            "status": self.status,
            "error": self.error,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "rows": [{**asdict(r), "duration_s": r.duration_s} for r in self.rows],
            "markers": [asdict(m) for m in self.markers],
            "summary": self.summary.to_dict(),
        }


class _NodeState:
    __slots__ = ("attempt_start", "backoff_start", "ready")

    def __init__(self) -> None:
        self.ready: float | None = None
        self.attempt_start: float | None = None
        self.backoff_start: float | None = None


def build_timeline(
    events: Sequence[Event], *, deps: Mapping[str, Iterable[str]] | None = None
) -> Timeline:
    """The timeline of one run from its events in journal order (ValueError if empty).
    `deps` (node id → the node ids it reads) makes the summary's critical path exact."""
    if not events:
        raise ValueError("no events: nothing to draw")
    run_ids = {e.run_id for e in events}
    if len(run_ids) > 1:
        raise ValueError(f"events of several runs: {sorted(run_ids)}")
    builder = _Builder(events[0].ts)
    for event in events:
        builder.feed(event)
    end = events[-1].ts - builder.origin
    builder.close_open(end)
    return Timeline(
        run_id=events[0].run_id,
        graph=builder.graph,
        status=builder.status,
        error=builder.error,
        started_at=builder.origin,
        duration_s=end,
        rows=_tree_order(builder.rows),
        markers=builder.markers,
        summary=summarize_run(events, deps=deps),
    )


class _Builder:
    """Folds events into rows, one event at a time (times relative to `origin`)."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.rows: dict[str, Row] = {}
        self.nodes: dict[str, _NodeState] = {}
        self.dispatched: dict[str, float] = {}
        self.first_token: dict[str, float] = {}
        self.open_pins: dict[str, Row] = {}
        self.markers: list[Marker] = []
        self.graph: str | None = None
        self.status: str | None = None
        self.error: str | None = None
        self._handlers: dict[type[Event], Callable[[Any, float], None]] = {
            RunStarted: self._run_started,
            NodeReady: self._node_ready,
            NodeStarted: self._node_started,
            NodeRetrying: self._node_retrying,
            NodeFinished: self._node_finished,
            NodeFailed: self._node_failed,
            NodeSkipped: self._node_skipped,
            LLMCallQueued: self._llm_queued,
            LLMCallDispatched: self._llm_dispatched,
            LLMTokens: self._llm_tokens,
            LLMCallFinished: self._llm_finished,
            ToolCallStarted: self._tool_started,
            ToolCallFinished: self._tool_finished,
            PinSet: self._pin_set,
            PinReleased: self._pin_released,
            RunFinished: self._run_finished,
        }

    def feed(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event, event.ts - self.origin)

    def close_open(self, end: float) -> None:
        """Draw what is still running when the journal ends up to its end."""
        for node, state in self.nodes.items():
            if state.attempt_start is not None:
                self.rows[node].segments.append(Segment("attempt", state.attempt_start, end))
        for row in self.open_pins.values():
            row.segments.append(Segment("pin", row.start_s, end))

    # -- nodes -------------------------------------------------------------------------

    def _node_row(self, node: str, at: float) -> Row:
        row = self.rows.get(node)
        if row is None:
            row = self.rows[node] = Row(node, "node", node, parent_instance(node), at)
        return row

    def _close_attempt(self, node: str, at: float, kind: str) -> None:
        state = self.nodes.get(node)
        if state is not None and state.attempt_start is not None:
            self.rows[node].segments.append(Segment(kind, state.attempt_start, at))
            state.attempt_start = None

    def _run_started(self, e: RunStarted, at: float) -> None:
        self.graph = self.graph or e.graph
        if not e.resumed:
            self.markers.append(Marker("started", at, e.graph))
            return
        # what was running when the process died runs again: its attempt ended here
        for node, state in self.nodes.items():
            if state.attempt_start is not None:
                self._close_attempt(node, at, "failed")
                self.rows[node].detail["interrupted"] = True
        self.markers.append(Marker("resumed", at))

    def _node_ready(self, e: NodeReady, at: float) -> None:
        self.nodes.setdefault(e.node, _NodeState()).ready = at

    def _node_started(self, e: NodeStarted, at: float) -> None:
        state = self.nodes.setdefault(e.node, _NodeState())
        row = self.rows.get(e.node)
        if row is None or row.end_s is not None:  # first start (or a new life)
            row = self.rows[e.node] = Row(e.node, "node", e.node, parent_instance(e.node), at)
            if state.ready is not None and state.ready < at:
                row.start_s = state.ready
                row.segments.append(Segment("wait", state.ready, at))
        if state.backoff_start is not None:
            row.segments.append(Segment("backoff", state.backoff_start, at))
            state.backoff_start = None
        row.attempts = max(row.attempts, e.attempt)
        row.status = "running"
        state.attempt_start = at

    def _node_retrying(self, e: NodeRetrying, at: float) -> None:
        row = self._node_row(e.node, at)
        self._close_attempt(e.node, at, "failed")
        self.nodes.setdefault(e.node, _NodeState()).backoff_start = at
        row.detail.setdefault("errors", []).append(e.error)

    def _node_finished(self, e: NodeFinished, at: float) -> None:
        row = self._node_row(e.node, at - e.duration_s)
        self._close_attempt(e.node, at, "attempt")
        row.end_s = at
        row.status = "fallback" if row.status == "failed" else "done"

    def _node_failed(self, e: NodeFailed, at: float) -> None:
        row = self._node_row(e.node, at)
        self._close_attempt(e.node, at, "failed")
        row.status = "failed"
        row.detail["error"] = e.error
        row.detail["policy"] = e.policy
        if e.policy not in SETTLED_LATER:
            row.end_s = at

    def _node_skipped(self, e: NodeSkipped, at: float) -> None:
        row = self._node_row(e.node, at)
        self._close_attempt(e.node, at, "failed")
        row.end_s = at
        row.status = "skipped"
        row.detail["reason"] = e.reason

    # -- LLM calls ---------------------------------------------------------------------

    def _call_row(self, call_id: str, kind: str, label: str, node: str, start: float) -> Row:
        row = self.rows.get(call_id)
        if row is None:  # the call's opening event is not in the journal
            row = self.rows[call_id] = Row(call_id, kind, label, node, start)
        return row

    def _llm_queued(self, e: LLMCallQueued, at: float) -> None:
        row = self.rows[e.call_id] = Row(e.call_id, "llm", f"llm {e.model}", e.node, at)
        row.detail["model"] = e.model

    def _llm_dispatched(self, e: LLMCallDispatched, at: float) -> None:
        self.dispatched[e.call_id] = at
        row = self._call_row(e.call_id, "llm", "llm", e.node, at)
        if at > row.start_s:
            row.segments.append(Segment("queue", row.start_s, at))
        row.detail["queue_wait_s"] = e.queue_wait_s
        row.detail["priority"] = e.priority
        if e.replica is not None:
            row.detail["replica"] = e.replica

    def _llm_tokens(self, e: LLMTokens, at: float) -> None:
        self.first_token.setdefault(e.call_id, at)

    def _llm_finished(self, e: LLMCallFinished, at: float) -> None:
        row = self._call_row(e.call_id, "llm", f"llm {e.model}", e.node, at - e.duration_s)
        sent = self.dispatched.pop(e.call_id, row.start_s)
        ttft = e.ttft_s
        first = self.first_token.pop(e.call_id, None)
        if ttft is None and first is not None:
            ttft = first - sent
        if e.error is not None:
            row.segments.append(Segment("error", sent, at))
        elif ttft is not None:
            # wall clock vs the backend's own clock: keep the split inside the call
            split = min(max(sent + ttft, sent), at)
            row.segments.append(Segment("prefill", sent, split))
            row.segments.append(Segment("decode", split, at))
        else:
            row.segments.append(Segment("call", sent, at))
        row.end_s = at
        row.status = "error" if e.error is not None else "ok"
        row.detail.update(
            model=e.model,
            input_tokens=e.prompt_tokens,
            output_tokens=e.completion_tokens,
            cached_tokens=e.cached_prompt_tokens,
            ttft_s=ttft,
            tool_calls=e.tool_calls,
        )
        if e.replica is not None:
            row.detail["replica"] = e.replica
        if e.finish_reason:
            row.detail["finish_reason"] = e.finish_reason
        if e.error is not None:
            row.detail["error"] = e.error

    # -- tool calls and pins -----------------------------------------------------------

    def _tool_started(self, e: ToolCallStarted, at: float) -> None:
        row = self.rows[e.call_id] = Row(e.call_id, "tool", f"tool {e.tool}", e.node, at)
        row.detail["tool"] = e.tool

    def _tool_finished(self, e: ToolCallFinished, at: float) -> None:
        row = self._call_row(e.call_id, "tool", f"tool {e.tool}", e.node, at - e.duration_s)
        row.segments.append(Segment("tool" if e.ok else "error", row.start_s, at))
        row.end_s = at
        row.status = "ok" if e.ok else "error"
        row.detail["tool"] = e.tool
        if e.error is not None:
            row.detail["error"] = e.error

    def _pin_set(self, e: PinSet, at: float) -> None:
        key = f"pin:{e.call_id}"
        old = self.open_pins.pop(e.call_id, None)
        if old is not None:  # re-pinned: the old pin ends where the new one starts
            old.segments.append(Segment("pin", old.start_s, at))
            old.end_s, old.status = at, "released"
            old.detail["reason"] = "re-pinned"
        if key in self.rows:
            key = f"pin:{e.call_id}@{e.seq}"
        row = self.rows[key] = Row(key, "pin", "pin", e.node, at, status="held")
        row.detail.update(call_id=e.call_id, ttl_s=e.ttl_s, tokens=e.tokens)
        self.open_pins[e.call_id] = row

    def _pin_released(self, e: PinReleased, at: float) -> None:
        row = self.open_pins.pop(e.call_id, None)
        if row is None:
            return
        row.segments.append(Segment("pin", row.start_s, at))
        row.end_s = at
        row.status = "released"
        row.detail.update(used=e.used, reason=e.reason)

    def _run_finished(self, e: RunFinished, at: float) -> None:
        self.status, self.error = e.status, e.error
        self.markers.append(Marker("finished", at, e.status))


def _tree_order(rows: Mapping[str, Row]) -> list[Row]:
    """Rows depth-first: each node followed by what happened inside it, by start time."""
    children: dict[str | None, list[Row]] = {}
    for row in rows.values():
        parent = row.parent
        while parent is not None and rows.get(parent, None) is None:
            parent = parent_instance(parent)  # the holder was restored, not run
        if parent is not None and rows[parent].kind != "node":
            parent = None
        row.parent = parent
        children.setdefault(parent, []).append(row)
    ordered: list[Row] = []

    def visit(parent: str | None, depth: int) -> None:
        for row in sorted(children.get(parent, ()), key=lambda r: (r.start_s, r.id)):
            row.depth = depth
            ordered.append(row)
            if row.kind == "node":
                visit(row.id, depth + 1)

    visit(None, 0)
    return ordered
