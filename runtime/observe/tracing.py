"""OpenTelemetry tracing of runs, built from the run's events.

`OtelTracer.listener` is a run listener (`Runtime(listeners=[tracer.listener])`). It turns
events into spans with the events' own wall-clock timestamps:

    invoke_workflow {graph} ─┬─ node ─┬─ chat {model}         (CLIENT)
                             │        ├─ execute_tool {tool}
                             │        ├─ kv.pin               (linked to the chat that pinned)
                             │        └─ node                 (map elements, subgraph nodes,
                             └─ node …                         planner tasks: under their parent)

Names, kinds and `gen_ai.*` attributes are those of OpenTelemetry's GenAI semantic
conventions (Development status): a run is a workflow, an LLM call an inference span with
the model it really goes to, its provider and server (the backend's `target`; the alias is
`treadle.model_alias`). Nodes and KV pins have no convention: `node` and `kv.pin` are ours.
A node keeps one span across its attempts; each retry is a span event. Failures set the
span status to ERROR. A node or LLM call answered by the result cache has
`treadle.cache_hit` set (and a `cache_hit` span event); a cached LLM call has no tokens. A
run that parks to wait for human input ends its `run` span with status `waiting` (the
`ask` node's span has an `input_requested` event); when it resumes, its new `run` span
links to that one. The listener is also a call interceptor
(`treadle.runtime.core.interceptors`), which the runtime puts in its chain: it adds the
W3C `traceparent` of each call's `chat` span to the request it passes on, so a serving
engine that traces joins the run's trace.

A run's parent context is a traceparent given with `set_parent(run_id, ...)` before it
starts (the daemon's worker passes the one the API request stored in `RunRecord.meta`), or
else the context that was current when the run was started (an SDK user's own span).

`configure_tracing()` (`treadle.runtime.observe.tracing_setup`) builds a tracer from the
standard `OTEL_*` variables; tracing off costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from treadle.errors import SetupError
from treadle.runtime.core.context import LLMCall, RunContext, SendLLM
from treadle.runtime.core.events import (
    CacheHit,
    Event,
    GraphExtended,
    InputRequested,
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
    RunWaiting,
    ToolCallFinished,
    ToolCallStarted,
)
from treadle.runtime.core.interceptors import CallInterceptor, with_headers
from treadle.runtime.observe.timeline import SETTLED_LATER, parent_instance

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer, TracerProvider

    from treadle.backends.base import LLMResponse


INSTRUMENTATION_NAME = "treadle"

# Span names of treadle's own spans (low cardinality: node ids are attributes); the GenAI
# spans are named `{gen_ai.operation.name} {what}` as the conventions say.
SPAN_NODE = "node"
SPAN_PIN = "kv.pin"

# GenAI semantic conventions, as named in opentelemetry-semantic-conventions 0.66b2
# (`opentelemetry.semconv._incubating.attributes.gen_ai_attributes`); spelled out here
# because that module is incubating and marks the whole namespace as moving.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
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
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"

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
T_MODEL_ALIAS = "treadle.model_alias"
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
T_CACHE_HIT = "treadle.cache_hit"
T_CACHE_KEY = "treadle.cache_key"
T_WAITING_FOR = "treadle.waiting_for"
T_PROMPT = "treadle.prompt"

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


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
        #: the `run` spans of runs parked for input, which their resumed span links to
        self._parked: dict[str, SpanContext] = {}
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
            CacheHit: self._on_cache_hit,
            InputRequested: self._on_input_requested,
            RunWaiting: self._on_run_waiting,
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
        parked = self._parked.pop(event.run_id, None)
        if parked is not None:  # resumed after waiting for input: its last life
            links.append(self._trace.Link(parked))
        old = self._runs.pop(event.run_id, None)
        if old is not None:
            # a second RunStarted without RunFinished: the run was resumed; its first life
            # ended (at the latest) where its journal stops, and the new one links to it
            end = previous_end if previous_end is not None else event.ts
            self._close(old, end, status="interrupted", error=None)
            links.append(self._trace.Link(old.run_span.get_span_context()))
        attrs: dict[str, Any] = {T_RUN_ID: event.run_id, GEN_AI_OPERATION_NAME: OP_INVOKE_WORKFLOW}
        name = OP_INVOKE_WORKFLOW
        if isinstance(event, RunStarted):
            name = f"{OP_INVOKE_WORKFLOW} {event.graph}"
            attrs[T_GRAPH] = event.graph
            attrs[GEN_AI_WORKFLOW_NAME] = event.graph
            attrs[T_RESUMED] = event.resumed
        if tenant:
            attrs[T_TENANT] = tenant
        span = self.tracer.start_span(
            name, context=parent, attributes=attrs, links=links, start_time=_ns(event.ts)
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
        # what sampling decisions may use is set at creation (the conventions ask so):
        # operation, provider, model and server
        model = e.model
        attrs: dict[str, Any] = {
            GEN_AI_OPERATION_NAME: OP_CHAT,
            GEN_AI_CONVERSATION_ID: state.run_id,
            T_MODEL_ALIAS: e.model,
            T_RUN_ID: state.run_id,
            T_NODE: e.node,
            T_CALL_ID: e.call_id,
        }
        if isinstance(e, LLMCallQueued):
            model = e.request_model or e.model
            optional = {
                GEN_AI_PROVIDER_NAME: e.provider,
                SERVER_ADDRESS: e.server_address,
                SERVER_PORT: e.server_port,
                GEN_AI_REQUEST_MAX_TOKENS: e.max_tokens,
                GEN_AI_REQUEST_TEMPERATURE: e.temperature,
            }
            attrs.update((k, v) for k, v in optional.items() if v is not None)
        attrs[GEN_AI_REQUEST_MODEL] = model
        if state.tenant:
            attrs[T_TENANT] = state.tenant
        return self.tracer.start_span(
            f"{OP_CHAT} {model}",
            context=self._context_of(state, e.node),
            kind=self._trace.SpanKind.CLIENT,
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
        if e.response_model:
            attrs[GEN_AI_RESPONSE_MODEL] = e.response_model
        if e.response_id:
            attrs[GEN_AI_RESPONSE_ID] = e.response_id
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
            f"{OP_EXECUTE_TOOL} {e.tool}",
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

    # -- the result cache, human input ---------------------------------------------------

    def _on_cache_hit(self, state: _RunTrace, e: CacheHit) -> None:
        if not state.recording:
            return
        span = state.llm.get(e.call_id) if e.call_id else state.nodes.get(e.node)
        if span is not None:
            span.set_attribute(T_CACHE_HIT, True)
            span.add_event("cache_hit", {T_CACHE_KEY: e.key}, timestamp=_ns(e.ts))

    def _on_input_requested(self, state: _RunTrace, e: InputRequested) -> None:
        span = state.nodes.get(e.node) if state.recording else None
        if span is not None:
            span.add_event("input_requested", {T_PROMPT: e.prompt}, timestamp=_ns(e.ts))

    def _on_run_waiting(self, state: _RunTrace, e: RunWaiting) -> None:
        # a person may take days: this life of the run ends here, the next links to it
        self._runs.pop(state.run_id, None)
        self._parked[state.run_id] = state.run_span.get_span_context()
        if len(self._parked) > _ENDED_KEPT:
            del self._parked[next(iter(self._parked))]
        state.run_span.set_attribute(T_WAITING_FOR, list(e.nodes))
        self._close(state, e.ts, status="waiting", error=None)

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treadle")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0"
