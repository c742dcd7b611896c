"""The timeline of one run, folded from its event journal (the data behind `treadle trace`).

Any store's `read_events(run_id)` gives what `build_timeline` needs. The timeline has one
row per node instance (map elements, subgraph nodes and planner tasks nested under the node
that holds them), per LLM call (split into queue / prefill / decode where the time to first
token is known), per tool call and per KV pin. Times are seconds from the run's first event.
`Timeline.to_dict()` is the `--json` form; `treadle.trace_view` draws it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from treadle.runtime.events import (
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
from treadle.runtime.metrics import RunSummary, summarize_run

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
    origin = events[0].ts
    rows: dict[str, Row] = {}
    nodes: dict[str, _NodeState] = {}
    dispatched: dict[str, float] = {}
    first_token: dict[str, float] = {}
    markers: list[Marker] = []
    graph: str | None = None
    status: str | None = None
    error: str | None = None

    def t(ts: float) -> float:
        return ts - origin

    def node_row(node: str, at: float) -> Row:
        row = rows.get(node)
        if row is None:
            row = rows[node] = Row(node, "node", node, parent_instance(node), at)
        return row

    def close_attempt(node: str, at: float, kind: str) -> None:
        state = nodes.get(node)
        if state is not None and state.attempt_start is not None:
            rows[node].segments.append(Segment(kind, state.attempt_start, at))
            state.attempt_start = None

    for e in events:
        at = t(e.ts)
        if isinstance(e, RunStarted):
            graph = graph or e.graph
            if e.resumed:
                # what was running when the process died runs again: close it here
                for node, state in nodes.items():
                    if state.attempt_start is not None:
                        close_attempt(node, at, "failed")
                        rows[node].detail["interrupted"] = True
                markers.append(Marker("resumed", at))
            else:
                markers.append(Marker("started", at, e.graph))
        elif isinstance(e, NodeReady):
            nodes.setdefault(e.node, _NodeState()).ready = at
        elif isinstance(e, NodeStarted):
            state = nodes.setdefault(e.node, _NodeState())
            row = rows.get(e.node)
            if row is None or row.end_s is not None:  # first start (or a new life)
                row = rows[e.node] = Row(e.node, "node", e.node, parent_instance(e.node), at)
                if state.ready is not None and state.ready < at:
                    row.start_s = state.ready
                    row.segments.append(Segment("wait", state.ready, at))
            if state.backoff_start is not None:
                row.segments.append(Segment("backoff", state.backoff_start, at))
                state.backoff_start = None
            row.attempts = max(row.attempts, e.attempt)
            row.status = "running"
            state.attempt_start = at
        elif isinstance(e, NodeRetrying):
            node_row(e.node, at)
            close_attempt(e.node, at, "failed")
            nodes.setdefault(e.node, _NodeState()).backoff_start = at
            rows[e.node].detail.setdefault("errors", []).append(e.error)
        elif isinstance(e, NodeFinished):
            row = node_row(e.node, at - e.duration_s)
            close_attempt(e.node, at, "attempt")
            row.end_s = at
            row.status = "fallback" if row.status == "failed" else "done"
        elif isinstance(e, NodeFailed):
            row = node_row(e.node, at)
            close_attempt(e.node, at, "failed")
            row.status = "failed"
            row.detail["error"] = e.error
            row.detail["policy"] = e.policy
            if e.policy not in ("skip", "fallback"):  # those settle it with a later event
                row.end_s = at
        elif isinstance(e, NodeSkipped):
            row = node_row(e.node, at)
            close_attempt(e.node, at, "failed")
            row.end_s = at
            row.status = "skipped"
            row.detail["reason"] = e.reason
        elif isinstance(e, LLMCallQueued):
            row = rows[e.call_id] = Row(e.call_id, "llm", f"llm {e.model}", e.node, at)
            row.detail["model"] = e.model
        elif isinstance(e, LLMCallDispatched):
            dispatched[e.call_id] = at
            row = rows.get(e.call_id) or _call_row(rows, e.call_id, "llm", "llm", e.node, at)
            if at > row.start_s:
                row.segments.append(Segment("queue", row.start_s, at))
            row.detail["queue_wait_s"] = e.queue_wait_s
            row.detail["priority"] = e.priority
            if e.replica is not None:
                row.detail["replica"] = e.replica
        elif isinstance(e, LLMTokens):
            first_token.setdefault(e.call_id, at)
        elif isinstance(e, LLMCallFinished):
            row = rows.get(e.call_id) or _call_row(
                rows, e.call_id, "llm", f"llm {e.model}", e.node, at - e.duration_s
            )
            sent = dispatched.pop(e.call_id, row.start_s)
            ttft = e.ttft_s
            if ttft is None and e.call_id in first_token:
                ttft = first_token[e.call_id] - sent
            first_token.pop(e.call_id, None)
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
            if e.error is not None:
                row.detail["error"] = e.error
        elif isinstance(e, ToolCallStarted):
            row = rows[e.call_id] = Row(e.call_id, "tool", f"tool {e.tool}", e.node, at)
            row.detail["tool"] = e.tool
        elif isinstance(e, ToolCallFinished):
            row = rows.get(e.call_id) or _call_row(
                rows, e.call_id, "tool", f"tool {e.tool}", e.node, at - e.duration_s
            )
            row.segments.append(Segment("tool" if e.ok else "error", row.start_s, at))
            row.end_s = at
            row.status = "ok" if e.ok else "error"
            row.detail["tool"] = e.tool
            if e.error is not None:
                row.detail["error"] = e.error
        elif isinstance(e, PinSet):
            key = f"pin:{e.call_id}"
            old = rows.get(key)
            if old is not None and old.end_s is None:  # re-pinned
                old.segments.append(Segment("pin", old.start_s, at))
                old.end_s, old.status = at, "released"
                old.detail["reason"] = "re-pinned"
                key = f"pin:{e.call_id}@{e.seq}"
            row = rows[key] = Row(key, "pin", "pin", e.node, at)
            row.status = "held"
            row.detail.update(call_id=e.call_id, ttl_s=e.ttl_s, tokens=e.tokens)
        elif isinstance(e, PinReleased):
            row = next(
                (
                    r
                    for r in reversed(rows.values())
                    if r.kind == "pin" and r.end_s is None and r.detail["call_id"] == e.call_id
                ),
                None,
            )
            if row is not None:
                row.segments.append(Segment("pin", row.start_s, at))
                row.end_s = at
                row.status = "released"
                row.detail.update(used=e.used, reason=e.reason)
        elif isinstance(e, RunFinished):
            status, error = e.status, e.error
            markers.append(Marker("finished", at, e.status))
    end = t(events[-1].ts)
    for node, state in nodes.items():  # attempts still running when the journal ends
        if state.attempt_start is not None:
            rows[node].segments.append(Segment("attempt", state.attempt_start, end))
    for row in rows.values():
        if row.kind == "pin" and row.end_s is None:
            row.segments.append(Segment("pin", row.start_s, end))
    return Timeline(
        run_id=events[0].run_id,
        graph=graph,
        status=status,
        error=error,
        started_at=origin,
        duration_s=end,
        rows=_tree_order(rows),
        markers=markers,
        summary=summarize_run(events, deps=deps),
    )


def _call_row(
    rows: dict[str, Row], call_id: str, kind: str, label: str, node: str, start: float
) -> Row:
    """A call row for a call whose opening event is missing from the journal."""
    row = rows[call_id] = Row(call_id, kind, label, node, start)
    return row


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
