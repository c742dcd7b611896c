"""OpenTelemetry tracing of runs, built from the run's events.

`OtelTracer.listener` is a run listener (`Runtime(listeners=[tracer.listener])`). It turns
events into spans with the events' own wall-clock timestamps:

    run ─┬─ node ─┬─ llm.call        (gen_ai.* attributes, queue wait, replica, TTFT)
         │        ├─ tool.call       (gen_ai.tool.name)
         │        ├─ kv.pin          (TTL, used; linked to the llm.call that pinned)
         │        └─ node            (map elements `m[i]`, subgraph nodes `sub/x`,
         │                            planner tasks `planner/taskN`: under their parent)
         └─ node …

A node keeps one span across its attempts; each retry is a span event. Failures set the
span status to ERROR. The listener is also a call interceptor
(`treadle.runtime.core.interceptors`), which the runtime puts in its chain: it adds the
W3C `traceparent` of each call's `llm.call` span to the request it passes on, so a serving
engine that traces joins the run's trace.

A run's parent context is a traceparent given with `set_parent(run_id, ...)` before it
starts (the daemon's worker passes the one the API request stored in `RunRecord.meta`), or
else the context that was current when the run was started (an SDK user's own span).

`configure_tracing()` builds a tracer from the standard `OTEL_*` variables. Tracing is
opt-in: without `OTEL_TRACES_EXPORTER` (or with `none`) it returns None, no listener is
installed, and the OpenTelemetry SDK is never imported, so tracing off costs nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from treadle.errors import SetupError
from treadle.runtime.core.context import LLMCall, RunContext, SendLLM
from treadle.runtime.core.events import (
    Event,
    GraphExtended,
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
from treadle.runtime.core.interceptors import CallInterceptor, with_headers
from treadle.runtime.observe.timeline import SETTLED_LATER, parent_instance

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer, TracerProvider

    from treadle.backends.base import LLMResponse


INSTRUMENTATION_NAME = "treadle"

# Span names: one per kind, low cardinality (node ids and models are attributes).
SPAN_RUN = "run"
SPAN_NODE = "node"
SPAN_LLM = "llm.call"
SPAN_TOOL = "tool.call"
SPAN_PIN = "kv.pin"

# GenAI semantic conventions, as named in opentelemetry-semantic-conventions 0.66b2
# (`opentelemetry.semconv._incubating.attributes.gen_ai_attributes`); spelled out here
# because that module is incubating and marks the whole namespace as moving.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_WORKFLOW_NAME = "gen_ai.workflow.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
ERROR_TYPE = "error.type"

OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"
OP_INVOKE_WORKFLOW = "invoke_workflow"

# treadle's own attributes
T_RUN_ID = "treadle.run_id"
T_GRAPH = "treadle.graph"
T_TENANT = "treadle.tenant"
T_RESUMED = "treadle.resumed"
T_STATUS = "treadle.status"
T_NODE = "treadle.node"
T_ATTEMPT = "treadle.attempt"
T_RETRIES = "treadle.retries"
T_READY_WAIT_S = "treadle.ready_wait_s"
T_ERROR = "treadle.error"
T_ERROR_POLICY = "treadle.error_policy"
T_SKIP_REASON = "treadle.skip_reason"
T_UNFINISHED = "treadle.unfinished"
T_CALL_ID = "treadle.call_id"
T_QUEUE_WAIT_S = "treadle.queue_wait_s"
T_PRIORITY = "treadle.priority"
T_REPLICA = "treadle.replica"
T_PREFIX_HIT_TOKENS = "treadle.prefix_hit_tokens"
T_TTFT_S = "treadle.ttft_s"
T_TOOL_CALLS = "treadle.tool_calls"
T_PIN_TTL_S = "treadle.pin_ttl_s"
T_PIN_TOKENS = "treadle.pin_tokens"
T_PIN_USED = "treadle.pin_used"
T_PIN_RELEASE_REASON = "treadle.pin_release_reason"
T_INSTANCES = "treadle.instances"
T_LLM_CALLS = "treadle.llm_calls"

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_EXPORTERS = ("console", "otlp", "none")


class TracingUnavailable(SetupError, RuntimeError):
    """Tracing was asked for but the OpenTelemetry packages are not installed."""


#: a node's wait between ready and started is recorded when at least this long (a slot
#: under a concurrency limit; shorter is the orchestrator's own step)
_NOTABLE_WAIT_S = 0.001


#: how many finished run ids a tracer remembers, to drop their stragglers
_ENDED_KEPT = 4096


def _ns(ts: float) -> int:
    return int(ts * 1e9)


class _RunTrace:
    """The spans of one run while it is being traced."""

    __slots__ = (
        "first_token",
        "llm",
        "llm_calls",
        "llm_done",
        "nodes",
        "pins",
        "ready",
        "recording",
        "run_ctx",
        "run_id",
        "run_span",
        "tenant",
        "tokens_in",
        "tokens_out",
        "tools",
    )

    def __init__(self, run_id: str, span: Span, run_ctx: Context, tenant: str | None):
        self.run_id = run_id
        self.run_span = span
        self.run_ctx = run_ctx
        # a run sampled out gets no child spans; its context still propagates
        self.recording = span.is_recording()
        self.tenant = tenant
        #: node spans by instance id, open or ended (children look their parent up here)
        self.nodes: dict[str, Span] = {}
        self.ready: dict[str, float] = {}
        self.llm: dict[str, Span] = {}
        #: span contexts of finished LLM calls, for the pins that refer to them
        self.llm_done: dict[str, SpanContext] = {}
        self.tools: dict[str, Span] = {}
        self.pins: dict[str, Span] = {}
        self.first_token: set[str] = set()
        self.llm_calls = 0
        self.tokens_in = 0
        self.tokens_out = 0


class OtelTracer:
    """Builds OpenTelemetry spans from run events (see the module docstring).

    `tracer_provider` defaults to the global one (an application's own OpenTelemetry
    setup). With `owns_provider`, `shutdown()` flushes and shuts it down.
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, *, owns_provider: bool = False
    ) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError as exc:  # pragma: no cover - the otel extra is a dev dependency
            raise TracingUnavailable(
                "tracing needs OpenTelemetry: pip install 'treadle[otel]'"
            ) from exc
        self._trace = trace
        self._propagate = propagate
        self.provider = tracer_provider or trace.get_tracer_provider()
        self._owns_provider = owns_provider
        self.tracer: Tracer = self.provider.get_tracer(INSTRUMENTATION_NAME, _version())
        #: the run listener and call interceptor: `Runtime(listeners=[tracer.listener])`
        self.listener = TracingListener(self)
        self._runs: dict[str, _RunTrace] = {}
        self._parents: dict[str, Context] = {}
        #: runs that finished lately: an event after a run's end (e.g. a pin released as
        #: it ends) must not open a second `run` span that never closes
        self._ended: dict[str, None] = {}
        self._handlers: dict[type[Event], Callable[[_RunTrace, Any], None]] = {
            NodeReady: self._on_node_ready,
            NodeStarted: self._on_node_started,
            NodeRetrying: self._on_node_retrying,
            NodeFinished: self._on_node_finished,
            NodeFailed: self._on_node_failed,
            NodeSkipped: self._on_node_skipped,
            GraphExtended: self._on_graph_extended,
            LLMCallQueued: self._on_llm_queued,
            LLMCallDispatched: self._on_llm_dispatched,
            LLMTokens: self._on_llm_tokens,
            LLMCallFinished: self._on_llm_finished,
            ToolCallStarted: self._on_tool_started,
            ToolCallFinished: self._on_tool_finished,
            PinSet: self._on_pin_set,
            PinReleased: self._on_pin_released,
            RunFinished: self._on_run_finished,
        }

    @classmethod
    def in_memory(cls) -> tuple[OtelTracer, InMemorySpanExporter]:
        """A tracer on a private provider that keeps finished spans in memory (tests,
        benchmarks). Spans are exported synchronously as they end."""
        try:
            from opentelemetry.sdk.trace import TracerProvider as SdkProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
        except ImportError as exc:  # pragma: no cover - the otel extra is a dev dependency
            raise TracingUnavailable(
                "tracing needs the OpenTelemetry SDK: pip install 'treadle[otel]'"
            ) from exc

        exporter = InMemorySpanExporter()
        provider = SdkProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider, owns_provider=True), exporter

    # -- runs and their parents -------------------------------------------------------

    def set_parent(self, run_id: str, traceparent: str, tracestate: str | None = None) -> None:
        """Trace the run `run_id` (when it starts) under this W3C trace context
        (ValueError if `traceparent` is not a valid one)."""
        self._parents[run_id] = self.extract(traceparent, tracestate)
        if len(self._parents) > _ENDED_KEPT:  # parents of runs that never started
            del self._parents[next(iter(self._parents))]

    def extract(self, traceparent: str, tracestate: str | None = None) -> Context:
        """The context of a W3C `traceparent` (ValueError if it is not a valid one)."""
        carrier = {TRACEPARENT: traceparent}
        if tracestate:
            carrier[TRACESTATE] = tracestate
        context = self._propagate.extract(carrier)
        if not self._trace.get_current_span(context).get_span_context().is_valid:
            raise ValueError(f"not a valid W3C traceparent: {traceparent!r}")
        return context

    def _begin(
        self,
        event: Event,
        *,
        tenant: str | None,
        parent: Context | None,
        previous_end: float | None = None,
    ) -> _RunTrace:
        links = []
        old = self._runs.pop(event.run_id, None)
        if old is not None:
            # a second RunStarted without RunFinished: the run was resumed; its first life
            # ended (at the latest) where its journal stops, and the new one links to it
            end = previous_end if previous_end is not None else event.ts
            self._close(old, end, status="interrupted", error=None)
            links.append(self._trace.Link(old.run_span.get_span_context()))
        attrs: dict[str, Any] = {T_RUN_ID: event.run_id, GEN_AI_OPERATION_NAME: OP_INVOKE_WORKFLOW}
        if isinstance(event, RunStarted):
            attrs[T_GRAPH] = event.graph
            attrs[GEN_AI_WORKFLOW_NAME] = event.graph
            attrs[T_RESUMED] = event.resumed
        if tenant:
            attrs[T_TENANT] = tenant
        span = self.tracer.start_span(
            SPAN_RUN, context=parent, attributes=attrs, links=links, start_time=_ns(event.ts)
        )
        state = _RunTrace(event.run_id, span, self._trace.set_span_in_context(span), tenant)
        self._runs[event.run_id] = state
        return state

    # -- the listener ------------------------------------------------------------------

    def on_event(self, ctx: RunContext, event: Event) -> None:
        """One event of a run (what `listener` does with it)."""
        kind = type(event)
        state = self._runs.get(event.run_id)
        if state is None and kind is not RunStarted and event.run_id in self._ended:
            return
        if kind is RunStarted or state is None:
            # without a parent set for it, the run's span is a child of the current context
            parent = self._parents.pop(event.run_id, None)
            state = self._begin(event, tenant=ctx.options.tenant, parent=parent)
            if kind is RunStarted:
                return
        handler = self._handlers.get(kind)
        if handler is None:
            return
        handler(state, event)

    def trace_headers(self, run_id: str, call_id: str) -> dict[str, str]:
        """The W3C trace context of an LLM call (of its run, for a run sampled out; {} for
        a run this tracer does not know)."""
        state = self._runs.get(run_id)
        if state is None:
            return {}
        span = state.llm.get(call_id) if state.recording else None
        context = self._trace.set_span_in_context(span) if span is not None else state.run_ctx
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=context)
        return carrier

    def replay(
        self,
        events: Iterable[Event],
        *,
        tenant: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        """Build the spans of a recorded run from its journal (e.g. read from a store)."""
        parent = self.extract(traceparent) if traceparent else None
        last: dict[str, float] = {}
        for event in events:
            previous = last.get(event.run_id)
            last[event.run_id] = event.ts
            state = self._runs.get(event.run_id)
            if state is None and not isinstance(event, RunStarted) and previous is not None:
                continue  # after the run's end: a straggler
            if isinstance(event, RunStarted) or state is None:
                state = self._begin(event, tenant=tenant, parent=parent, previous_end=previous)
                if isinstance(event, RunStarted):
                    continue
            handler = self._handlers.get(type(event))
            if handler is not None:
                handler(state, event)
        # a journal that stops without RunFinished (a crash, a run still going)
        for run_id, ts in last.items():
            state = self._runs.pop(run_id, None)
            if state is not None:
                self._close(state, ts, status="interrupted", error=None)

    def open_runs(self) -> list[str]:
        """Runs whose `run` span is still open (started, not finished)."""
        return list(self._runs)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        flush = getattr(self.provider, "force_flush", None)
        return bool(flush(timeout_millis)) if flush is not None else True

    def shutdown(self) -> None:
        """End the spans of unfinished runs, flush, and shut down an owned provider."""
        for state in list(self._runs.values()):
            self._close(state, time.time(), status="interrupted", error=None)
        self._runs.clear()
        if self._owns_provider:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()
        else:
            self.force_flush()

    # -- spans -------------------------------------------------------------------------

    def _context_of(self, state: _RunTrace, instance: str) -> Context:
        """The context to start a child of node `instance` in: that node's span, or its
        nearest traced ancestor's, or the run's."""
        node: str | None = instance
        while node is not None:
            span = state.nodes.get(node)
            if span is not None:
                return self._trace.set_span_in_context(span)
            node = parent_instance(node)
        return state.run_ctx

    def _node_span(self, state: _RunTrace, node: str, start: float, attempt: int = 1) -> Span:
        parent = parent_instance(node)
        context = self._context_of(state, parent) if parent is not None else state.run_ctx
        # few attributes: each costs the SDK a validation on a per-node hot path; the run
        # id is on the run span, the attempt is set when there is a second one
        attrs: dict[str, Any] = {T_NODE: node}
        if attempt > 1:
            attrs[T_ATTEMPT] = attempt
        ready = state.ready.pop(node, None)
        if ready is not None and start - ready >= _NOTABLE_WAIT_S:
            attrs[T_READY_WAIT_S] = start - ready
        span = self.tracer.start_span(
            SPAN_NODE, context=context, attributes=attrs, start_time=_ns(start)
        )
        state.nodes[node] = span
        return span

    def _open_node(self, state: _RunTrace, node: str, start: float) -> Span:
        span = state.nodes.get(node)
        if span is None or not span.is_recording():
            span = self._node_span(state, node, start)
        return span

    def _error(self, span: Span, message: str, error_type: str) -> None:
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message))
        span.set_attribute(ERROR_TYPE, error_type)

    # -- node events -------------------------------------------------------------------

    def _on_node_ready(self, state: _RunTrace, e: NodeReady) -> None:
        if state.recording:
            state.ready[e.node] = e.ts

    def _on_node_started(self, state: _RunTrace, e: NodeStarted) -> None:
        if not state.recording:
            return
        span = state.nodes.get(e.node)
        if span is not None and span.is_recording():  # the next attempt of an open node
            span.set_attributes({T_ATTEMPT: e.attempt, T_RETRIES: e.attempt - 1})
            return
        self._node_span(state, e.node, e.ts, e.attempt)

    def _on_node_retrying(self, state: _RunTrace, e: NodeRetrying) -> None:
        if not state.recording:
            return
        span = self._open_node(state, e.node, e.ts)
        span.add_event(
            "retry",
            {T_ATTEMPT: e.attempt, T_ERROR: e.error, "treadle.retry_delay_s": e.delay_s},
            timestamp=_ns(e.ts),
        )

    def _on_node_finished(self, state: _RunTrace, e: NodeFinished) -> None:
        if not state.recording:
            return
        span = self._open_node(state, e.node, e.ts - e.duration_s)
        span.end(end_time=_ns(e.ts))

    def _on_node_failed(self, state: _RunTrace, e: NodeFailed) -> None:
        if not state.recording:
            return
        span = self._open_node(state, e.node, e.ts)
        self._error(span, e.error, "node_failed")
        span.set_attributes({T_ERROR: e.error, T_ERROR_POLICY: e.policy, T_ATTEMPT: e.attempt})
        if e.policy not in SETTLED_LATER:
            span.end(end_time=_ns(e.ts))

    def _on_node_skipped(self, state: _RunTrace, e: NodeSkipped) -> None:
        if not state.recording:
            return
        # a node skipped before it ever started gets a zero-length span, so the trace
        # shows every node the run decided about
        span = self._open_node(state, e.node, e.ts)
        span.set_attributes({T_STATUS: "skipped", T_SKIP_REASON: e.reason})
        span.end(end_time=_ns(e.ts))

    def _on_graph_extended(self, state: _RunTrace, e: GraphExtended) -> None:
        if not state.recording:
            return
        span = state.nodes.get(e.node)
        if span is not None:
            span.add_event("graph.extended", {T_INSTANCES: len(e.instances)}, timestamp=_ns(e.ts))

    # -- LLM calls ---------------------------------------------------------------------

    def _llm_span(self, state: _RunTrace, e: LLMCallQueued | LLMCallFinished, start: float) -> Span:
        attrs: dict[str, Any] = {
            GEN_AI_OPERATION_NAME: OP_CHAT,
            GEN_AI_REQUEST_MODEL: e.model,
            GEN_AI_CONVERSATION_ID: state.run_id,
            T_RUN_ID: state.run_id,
            T_NODE: e.node,
            T_CALL_ID: e.call_id,
        }
        if state.tenant:
            attrs[T_TENANT] = state.tenant
        return self.tracer.start_span(
            SPAN_LLM,
            context=self._context_of(state, e.node),
            attributes=attrs,
            start_time=_ns(start),
        )

    def _on_llm_queued(self, state: _RunTrace, e: LLMCallQueued) -> None:
        state.llm_calls += 1
        if state.recording:
            state.llm[e.call_id] = self._llm_span(state, e, e.ts)

    def _on_llm_dispatched(self, state: _RunTrace, e: LLMCallDispatched) -> None:
        span = state.llm.get(e.call_id) if state.recording else None
        if span is None:
            return
        attrs: dict[str, Any] = {T_QUEUE_WAIT_S: e.queue_wait_s, T_PRIORITY: e.priority}
        if e.replica is not None:
            attrs[T_REPLICA] = e.replica
        span.set_attributes(attrs)
        span.add_event("dispatched", timestamp=_ns(e.ts))

    def _on_llm_tokens(self, state: _RunTrace, e: LLMTokens) -> None:
        if e.call_id in state.first_token or not state.recording:
            return
        state.first_token.add(e.call_id)
        span = state.llm.get(e.call_id)
        if span is not None:
            span.add_event("first_token", timestamp=_ns(e.ts))

    def _on_llm_finished(self, state: _RunTrace, e: LLMCallFinished) -> None:
        state.tokens_in += e.prompt_tokens
        state.tokens_out += e.completion_tokens
        if not state.recording:
            return
        span = state.llm.pop(e.call_id, None)
        if span is None:  # no queued event seen: the call's own duration places it
            span = self._llm_span(state, e, e.ts - e.duration_s)
        state.first_token.discard(e.call_id)
        attrs: dict[str, Any] = {
            GEN_AI_USAGE_INPUT_TOKENS: e.prompt_tokens,
            GEN_AI_USAGE_OUTPUT_TOKENS: e.completion_tokens,
            GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: e.cached_prompt_tokens,
            T_PREFIX_HIT_TOKENS: e.cached_prompt_tokens,
            T_TOOL_CALLS: e.tool_calls,
        }
        if e.ttft_s is not None:
            attrs[T_TTFT_S] = e.ttft_s
            attrs[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = e.ttft_s
        if e.replica is not None:
            attrs[T_REPLICA] = e.replica
        if e.finish_reason:
            attrs[GEN_AI_RESPONSE_FINISH_REASONS] = [e.finish_reason]
        span.set_attributes(attrs)
        if e.error is not None:
            self._error(span, e.error, "backend_error")
            span.set_attribute(T_ERROR, e.error)
        span.end(end_time=_ns(e.ts))
        state.llm_done[e.call_id] = span.get_span_context()

    # -- tool calls --------------------------------------------------------------------

    def _tool_span(
        self, state: _RunTrace, e: ToolCallStarted | ToolCallFinished, start: float
    ) -> Span:
        attrs: dict[str, Any] = {
            GEN_AI_OPERATION_NAME: OP_EXECUTE_TOOL,
            GEN_AI_TOOL_NAME: e.tool,
            T_RUN_ID: state.run_id,
            T_NODE: e.node,
            T_CALL_ID: e.call_id,
        }
        native = e.node + ":"
        if e.call_id.startswith(native):  # a model's tool call: its id follows the node
            attrs[GEN_AI_TOOL_CALL_ID] = e.call_id[len(native) :]
        return self.tracer.start_span(
            SPAN_TOOL,
            context=self._context_of(state, e.node),
            attributes=attrs,
            start_time=_ns(start),
        )

    def _on_tool_started(self, state: _RunTrace, e: ToolCallStarted) -> None:
        if state.recording:
            state.tools[e.call_id] = self._tool_span(state, e, e.ts)

    def _on_tool_finished(self, state: _RunTrace, e: ToolCallFinished) -> None:
        if not state.recording:
            return
        span = state.tools.pop(e.call_id, None)
        if span is None:  # no started event seen: the call's own duration places it
            span = self._tool_span(state, e, e.ts - e.duration_s)
        if not e.ok:
            message = e.error or "tool failed"
            self._error(span, message, "tool_error")
            span.set_attribute(T_ERROR, message)
        span.end(end_time=_ns(e.ts))

    # -- KV pins -----------------------------------------------------------------------

    def _on_pin_set(self, state: _RunTrace, e: PinSet) -> None:
        if not state.recording:
            return
        llm = state.llm.get(e.call_id)
        if llm is not None:  # the pin rides on the finishing call's request
            llm.set_attribute(T_PIN_TTL_S, e.ttl_s)
        pinned_by = llm.get_span_context() if llm is not None else state.llm_done.get(e.call_id)
        links = [self._trace.Link(pinned_by)] if pinned_by is not None else []
        old = state.pins.pop(e.call_id, None)
        if old is not None:  # re-pinned: the old pin ends where the new one starts
            old.end(end_time=_ns(e.ts))
        state.pins[e.call_id] = self.tracer.start_span(
            SPAN_PIN,
            context=self._context_of(state, e.node),
            attributes={
                T_RUN_ID: state.run_id,
                T_NODE: e.node,
                T_CALL_ID: e.call_id,
                T_PIN_TTL_S: e.ttl_s,
                T_PIN_TOKENS: e.tokens,
            },
            links=links,
            start_time=_ns(e.ts),
        )

    def _on_pin_released(self, state: _RunTrace, e: PinReleased) -> None:
        if not state.recording:
            return
        span = state.pins.pop(e.call_id, None)
        if span is None:
            return
        span.set_attributes({T_PIN_USED: e.used, T_PIN_RELEASE_REASON: e.reason})
        span.end(end_time=_ns(e.ts))

    # -- the end -----------------------------------------------------------------------

    def _on_run_finished(self, state: _RunTrace, e: RunFinished) -> None:
        self._runs.pop(state.run_id, None)
        self._ended[state.run_id] = None
        if len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        self._close(state, e.ts, status=e.status, error=e.error)

    def _close(self, state: _RunTrace, ts: float, *, status: str, error: str | None) -> None:
        end = _ns(ts)
        # whatever is still open was cut short by the end of the run
        for group in (state.pins, state.tools, state.llm):
            for span in group.values():
                span.set_attribute(T_UNFINISHED, True)
                span.end(end_time=end)
            group.clear()
        for span in state.nodes.values():
            if span.is_recording():
                span.set_attribute(T_UNFINISHED, True)
                span.end(end_time=end)
        state.nodes.clear()
        run = state.run_span
        run.set_attributes(
            {
                T_STATUS: status,
                T_LLM_CALLS: state.llm_calls,
                GEN_AI_USAGE_INPUT_TOKENS: state.tokens_in,
                GEN_AI_USAGE_OUTPUT_TOKENS: state.tokens_out,
            }
        )
        if status == "failed":
            self._error(run, error or "run failed", "run_failed")
        run.end(end_time=end)


class TracingListener(CallInterceptor):
    """`OtelTracer.listener`: called with every event of a run (spans), and, in the runtime's
    call chain, the interceptor that passes each LLM call's trace context on."""

    def __init__(self, tracer: OtelTracer) -> None:
        self.tracer = tracer

    def __call__(self, ctx: RunContext, event: Event) -> None:
        self.tracer.on_event(ctx, event)

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        # the call's span was opened by its LLMCallQueued event, before the chain
        headers = self.tracer.trace_headers(call.ctx.run_id, call.call_id)
        call.request = with_headers(call.request, headers)
        return await call_next(call)


def current_trace_headers() -> dict[str, str]:
    """The W3C trace context of the current span as headers (empty without tracing or
    without a current span): what the daemon's API stores in `RunRecord.meta` so that the
    worker's run joins the request's trace."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in (TRACEPARENT, TRACESTATE)}


def configure_tracing(*, set_global: bool = False) -> OtelTracer | None:
    """A tracer configured by the standard environment, or None when tracing is off.

    `OTEL_TRACES_EXPORTER`: a comma list of `console` (spans as JSON on stderr), `otlp`
    and `none`. Unset means off: unlike the OpenTelemetry default (`otlp`), a CLI should not
    send to a collector nobody asked for. `OTEL_SDK_DISABLED=true` turns it off too.
    `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`
    (default) or `grpc`, each needing its exporter package; the endpoint, headers and
    timeout are read by the exporter from its own `OTEL_EXPORTER_OTLP_*` variables.
    `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (default `treadle`),
    and `OTEL_TRACES_SAMPLER` / `OTEL_BSP_*` are honoured by the SDK itself.
    With `set_global`, the provider also becomes the process's global one, so spans that
    user code opens inside nodes are exported too.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER: unsupported exporter {unknown[0]!r} "
            f"(supported: {', '.join(_EXPORTERS)})"
        )
    names = [n for n in names if n != "none"]
    if not names:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']} needs OpenTelemetry: "
            "pip install 'treadle[otel]'"
        ) from exc
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "treadle"}))
    provider = SdkProvider(resource=resource)
    for name in dict.fromkeys(names):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    if set_global:
        trace.set_tracer_provider(provider)
    return OtelTracer(provider, owns_provider=True)


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout carries the command's own output (`treadle run --json`)
        return ConsoleSpanExporter(out=sys.stderr)
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        package = "opentelemetry-exporter-otlp-proto-http"
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )
        except ImportError:
            raise TracingUnavailable(
                f"OTLP over http/protobuf needs {package}: pip install {package}"
            ) from None
        return HttpExporter()
    if protocol == "grpc":
        package = "opentelemetry-exporter-otlp-proto-grpc"
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise TracingUnavailable(
                f"OTLP over grpc needs {package}: pip install {package}"
            ) from None
        return GrpcExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r} (http/protobuf or grpc)"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treadle")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0"
