"""Run metrics: Prometheus counters and histograms fed by run events, and a plain summary of
one run computed from its journal.

`RuntimeMetrics` is a run listener (`Runtime(listeners=[metrics.listener])`) that keeps its
series in a registry of its own (not prometheus-client's global one, so two runtimes or two
tests never share counts); `render()` is the text for `/metrics`. Components that know
live state (the scheduler's queue depth per tenant, in-flight calls per replica) add gauges
with `gauge()` or, read at scrape time, with `gauge_callback()`.

`RuntimeMetrics.calls_in_flight()` is a call interceptor (`Runtime(interceptors=[...])`)
that keeps `treadle_calls_in_flight{call, name}`: the LLM calls per model alias and the
tool calls per tool under way right now.

`summarize_run(events)` needs no Prometheus: total time, the critical path the run actually
took, tokens, the prefix-cache hit rate, and the time spent in LLM calls versus tools.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from treadle.errors import SetupError
from treadle.runtime.core.context import InvokeTool, LLMCall, SendLLM, ToolInvocation
from treadle.runtime.core.events import (
    CacheHit,
    Event,
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
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
from treadle.runtime.core.interceptors import CallInterceptor

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.metrics_core import Metric

    from treadle.backends.base import LLMResponse
    from treadle.graphs.compile import CompiledGraph
    from treadle.runtime.core.context import RunContext

#: seconds: queue waits and TTFT (milliseconds to a minute)
_FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds: calls, tools, nodes, pins and runs (milliseconds to an hour)
_SLOW_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


class MetricsUnavailable(SetupError, RuntimeError):
    """Prometheus metrics were asked for but prometheus-client is not installed."""


class RuntimeMetrics:
    """Prometheus series of runs, nodes, LLM calls, tool calls and KV pins."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise MetricsUnavailable(
                "metrics need prometheus-client, a dependency of treadle: reinstall treadle"
            ) from exc
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {}
        self._callbacks: dict[str, _CallbackGauge] = {}

        self.runs_started = Counter(
            "treadle_runs_started", "Runs started.", ["graph", "tenant"], registry=r
        )
        self.runs_finished = Counter(
            "treadle_runs_finished",
            "Runs finished, by final status.",
            ["graph", "tenant", "status"],
            registry=r,
        )
        self.runs_active = Gauge("treadle_runs_active", "Runs in progress.", ["tenant"], registry=r)
        self.run_duration = Histogram(
            "treadle_run_duration_seconds",
            "Wall time of a run.",
            ["graph", "status"],
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.nodes = Counter(
            "treadle_nodes",
            "Node instances settled, by outcome (finished, failed, skipped).",
            ["outcome"],
            registry=r,
        )
        self.node_retries = Counter("treadle_node_retries", "Node attempts retried.", registry=r)
        self.node_duration = Histogram(
            "treadle_node_duration_seconds",
            "Time from a node's start to its finish (all attempts).",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.node_ready_wait = Histogram(
            "treadle_node_ready_wait_seconds",
            "Time a node waited between ready and started (concurrency limits).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.llm_calls = Counter(
            "treadle_llm_calls",
            "LLM calls finished, by outcome (ok, error).",
            ["model", "replica", "outcome"],
            registry=r,
        )
        self.llm_queue_wait = Histogram(
            "treadle_llm_queue_wait_seconds",
            "Time an LLM call waited in treadle's scheduler before going to a backend.",
            ["model"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.llm_ttft = Histogram(
            "treadle_llm_ttft_seconds",
            "Time to first token of LLM calls (where the backend measured it).",
            ["model"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.llm_duration = Histogram(
            "treadle_llm_call_duration_seconds",
            "Time from sending an LLM call to its answer.",
            ["model"],
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter(
            "treadle_llm_tokens",
            "LLM tokens: input (prompt), cached (input served from the prefix cache), output.",
            ["model", "tenant", "type"],
            registry=r,
        )
        self.llm_cache_hits = Counter(
            "treadle_llm_cache_hit_calls",
            "LLM calls with at least one prompt token served from the prefix cache.",
            ["model"],
            registry=r,
        )
        self.result_cache_hits = Counter(
            "treadle_result_cache_hits",
            "Node outputs (scope node) and LLM answers (scope llm_call) taken from the "
            "result cache instead of being computed.",
            ["scope", "tenant"],
            registry=r,
        )
        self.result_cache_saved_tokens = Counter(
            "treadle_result_cache_saved_tokens",
            "LLM tokens not spent because an answer came from the result cache.",
            ["tenant"],
            registry=r,
        )
        self.runs_parked = Counter(
            "treadle_runs_parked",
            "Runs that parked to wait for human input (they hold nothing until resumed).",
            ["graph", "tenant"],
            registry=r,
        )
        self.tool_calls = Counter(
            "treadle_tool_calls",
            "Tool calls, by outcome (ok, error).",
            ["tool", "outcome"],
            registry=r,
        )
        self.tool_duration = Histogram(
            "treadle_tool_duration_seconds",
            "Duration of tool calls.",
            ["tool"],
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.pins_set = Counter("treadle_pins_set", "KV-cache pins set.", registry=r)
        self.pins_active = Gauge("treadle_pins_active", "KV-cache pins held now.", registry=r)
        self.pins_released = Counter(
            "treadle_pins_released",
            "KV-cache pins released, by reason (e.g. expired) and whether the next call "
            "used the pinned cache.",
            ["reason", "used"],
            registry=r,
        )
        self.pin_ttl = Histogram(
            "treadle_pin_ttl_seconds", "TTL of KV-cache pins.", buckets=_SLOW_BUCKETS, registry=r
        )
        self._live: dict[str, _LiveRun] = {}
        # the hot path (every node) skips a label lookup
        self._finished = self.nodes.labels("finished")

    # -- registry API for other components ---------------------------------------------

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge in this registry that the caller sets (e.g. the scheduler's queue depth
        per tenant). Asking again for the same name returns the same gauge."""
        from prometheus_client import Gauge

        labels = tuple(labelnames)
        existing = self._gauges.get(name)
        if existing is not None:
            if existing[1] != labels:
                raise ValueError(
                    f"gauge {name!r} already exists with labels {list(existing[1])}, "
                    f"not {list(labels)}"
                )
            return existing[0]
        gauge = Gauge(name, documentation, labels, registry=self.registry)
        self._gauges[name] = (gauge, labels)
        return gauge

    def gauge_callback(
        self,
        name: str,
        documentation: str,
        read: Callable[[], float | Mapping[tuple[str, ...], float]],
        labelnames: Sequence[str] = (),
    ) -> None:
        """A gauge whose values are read when `/metrics` is scraped: `read()` returns a
        number (no labels) or a mapping of label values to numbers (e.g. in-flight calls
        per replica: `{("replica-0",): 3, ("replica-1",): 5}`)."""
        if name in self._callbacks or name in self._gauges:
            raise ValueError(f"a gauge named {name!r} is already registered")
        collector = _CallbackGauge(name, documentation, tuple(labelnames), read)
        self.registry.register(collector)
        self._callbacks[name] = collector

    def remove_gauge_callback(self, name: str) -> None:
        collector = self._callbacks.pop(name, None)
        if collector is None:
            raise KeyError(f"no gauge callback named {name!r}")
        self.registry.unregister(collector)

    def render(self) -> str:
        """The Prometheus text exposition of every series (the body of `/metrics`)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return str(CONTENT_TYPE_LATEST)

    def calls_in_flight(self) -> CallsInFlight:
        """An interceptor that counts the calls under way (see the module docstring)."""
        return CallsInFlight(
            self.gauge(
                "treadle_calls_in_flight",
                "LLM calls (by model alias) and tool calls (by tool) under way.",
                ["call", "name"],
            )
        )

    # -- events ------------------------------------------------------------------------

    def listener(self, ctx: RunContext, event: Event) -> None:
        """Run listener: `Runtime(listeners=[metrics.listener])`."""
        self.observe(event, tenant=ctx.options.tenant)

    def observe(self, event: Event, *, tenant: str | None = None) -> None:
        """Count one event (the listener's work; also for replaying a journal)."""
        run = self._live.get(event.run_id)
        if run is None:
            # only RunStarted opens a run's entry (and RunFinished closes it), so an event
            # that comes after the end (or before a late listener saw the start) is counted
            # without leaving state behind
            run = _LiveRun("", tenant or "")
            if isinstance(event, RunStarted):
                self._live[event.run_id] = run
        if isinstance(event, NodeReady):
            run.ready[event.node] = event.ts
        elif isinstance(event, NodeStarted):
            # the first attempt ends the wait (a retry finds nothing here)
            ready = run.ready.pop(event.node, None)
            if ready is not None:
                self.node_ready_wait.observe(max(0.0, event.ts - ready))
        elif isinstance(event, NodeFinished):
            self._finished.inc()
            self.node_duration.observe(event.duration_s)
        elif isinstance(event, NodeFailed):
            self.nodes.labels("failed").inc()
        elif isinstance(event, NodeSkipped):
            run.ready.pop(event.node, None)
            self.nodes.labels("skipped").inc()
        elif isinstance(event, NodeRetrying):
            self.node_retries.inc()
        elif isinstance(event, LLMCallQueued):
            run.models[event.call_id] = event.model
        elif isinstance(event, LLMCallDispatched):
            model = run.models.get(event.call_id, "")
            self.llm_queue_wait.labels(model).observe(event.queue_wait_s)
        elif isinstance(event, LLMCallFinished):
            self._llm_finished(event, run)
        elif isinstance(event, ToolCallFinished):
            self.tool_calls.labels(event.tool, "ok" if event.ok else "error").inc()
            self.tool_duration.labels(event.tool).observe(event.duration_s)
        elif isinstance(event, PinSet):
            if event.call_id not in run.pins:
                run.pins.add(event.call_id)
                self.pins_active.inc()
            self.pins_set.inc()
            self.pin_ttl.observe(event.ttl_s)
        elif isinstance(event, PinReleased):
            if event.call_id in run.pins:
                run.pins.discard(event.call_id)
                self.pins_active.dec()
            self.pins_released.labels(event.reason, "true" if event.used else "false").inc()
        elif isinstance(event, RunStarted):
            if not run.started:
                run.started = True
                self.runs_active.labels(run.tenant).inc()
            run.graph = event.graph
            self.runs_started.labels(run.graph, run.tenant).inc()
        elif isinstance(event, RunFinished | RunWaiting):
            self._live.pop(event.run_id, None)
            if run.started:
                self.runs_active.labels(run.tenant).dec()
            if isinstance(event, RunWaiting):
                self.runs_parked.labels(run.graph, run.tenant).inc()
            else:
                self.runs_finished.labels(run.graph, run.tenant, event.status).inc()
                self.run_duration.labels(run.graph, event.status).observe(event.duration_s)
            # whatever the run still held is gone with it; the gauge must not drift
            if run.pins:
                self.pins_active.dec(len(run.pins))
        elif isinstance(event, CacheHit):
            scope = "llm_call" if event.call_id else "node"
            self.result_cache_hits.labels(scope, run.tenant).inc()
            if event.saved_tokens:
                self.result_cache_saved_tokens.labels(run.tenant).inc(event.saved_tokens)

    def _llm_finished(self, event: LLMCallFinished, run: _LiveRun) -> None:
        model = run.models.pop(event.call_id, event.model)
        outcome = "ok" if event.error is None else "error"
        self.llm_calls.labels(model, event.replica or "", outcome).inc()
        self.llm_duration.labels(model).observe(event.duration_s)
        if event.ttft_s is not None:
            self.llm_ttft.labels(model).observe(event.ttft_s)
        if event.prompt_tokens:
            self.llm_tokens.labels(model, run.tenant, "input").inc(event.prompt_tokens)
        if event.completion_tokens:
            self.llm_tokens.labels(model, run.tenant, "output").inc(event.completion_tokens)
        if event.cached_prompt_tokens:
            self.llm_tokens.labels(model, run.tenant, "cached").inc(event.cached_prompt_tokens)
            self.llm_cache_hits.labels(model).inc()


class CallsInFlight(CallInterceptor):
    """Keeps a gauge of the calls under way: +1 as a call goes on, -1 as it returns, fails
    or is cancelled."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge

    async def llm_call(self, call: LLMCall, call_next: SendLLM) -> LLMResponse:
        series = self.gauge.labels("llm", call.alias)
        series.inc()
        try:
            return await call_next(call)
        finally:
            series.dec()

    async def tool_call(self, call: ToolInvocation, call_next: InvokeTool) -> Any:
        series = self.gauge.labels("tool", call.tool.name)
        series.inc()
        try:
            return await call_next(call)
        finally:
            series.dec()


@dataclass
class _LiveRun:
    """What the metrics remember about a run in progress."""

    graph: str
    tenant: str
    started: bool = False
    #: node instance → when it became ready
    ready: dict[str, float] = field(default_factory=dict)
    #: LLM call id → model alias, while the call is in flight
    models: dict[str, str] = field(default_factory=dict)
    #: call ids whose KV pin is held
    pins: set[str] = field(default_factory=set)


class _CallbackGauge:
    """A collector that reads a gauge's values at scrape time."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        read: Callable[[], float | Mapping[tuple[str, ...], float]],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.read = read

    def describe(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        values = self.read()
        if isinstance(values, Mapping):
            for labels, value in values.items():
                if len(labels) != len(self.labelnames):
                    raise ValueError(
                        f"gauge {self.name!r}: label values {labels!r} do not match "
                        f"labels {list(self.labelnames)}"
                    )
                family.add_metric(list(labels), float(value))
        else:
            if self.labelnames:
                raise ValueError(f"gauge {self.name!r} has labels: read() must return a mapping")
            family.add_metric([], float(values))
        yield family


# -- the summary of one run (no Prometheus needed) ----------------------------------------


@dataclass
class CriticalStep:
    """One node on the critical path; times are seconds from the run's start."""

    node: str
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class RunSummary:
    run_id: str
    graph: str | None
    #: the final status, or None for a journal without RunFinished
    status: str | None
    #: wall time from the first to the last event (across resumes)
    total_s: float
    resumes: int = 0
    nodes_finished: int = 0
    nodes_failed: int = 0
    nodes_skipped: int = 0
    retries: int = 0
    llm_calls: int = 0
    llm_errors: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int = 0
    #: cached / input tokens over the run's LLM calls (None without input tokens)
    cache_hit_rate: float | None = None
    #: summed time of LLM calls from send to answer, and of their waits in the scheduler
    llm_time_s: float = 0.0
    llm_queue_s: float = 0.0
    #: wall time during which at least one LLM call was in flight (queued or sent)
    llm_wall_s: float = 0.0
    tool_time_s: float = 0.0
    #: wall time during which at least one tool call was running
    tool_wall_s: float = 0.0
    #: the chain of top-level nodes that determined the run's end, first to last
    critical_path: list[CriticalStep] = field(default_factory=list)
    #: nodes and LLM calls answered by the result cache, and the tokens that saved
    result_cache_hits: int = 0
    result_cache_saved_tokens: int = 0

    @property
    def critical_path_s(self) -> float:
        """Time spent inside the critical path's nodes (the rest is waiting between them)."""
        return sum(step.duration_s for step in self.critical_path)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["critical_path"] = [
            {**asdict(s), "duration_s": s.duration_s} for s in self.critical_path
        ]
        out["critical_path_s"] = self.critical_path_s
        return out

    def lines(self) -> list[str]:
        """A few human lines for the end of `treadle run`."""
        out = [
            f"{_secs(self.total_s)} · {counted(self.nodes_finished, 'node')} done"
            + (f", {self.nodes_failed} failed" if self.nodes_failed else "")
            + (f", {self.nodes_skipped} skipped" if self.nodes_skipped else "")
            + (f", {counted(self.retries, 'retry', 'retries')}" if self.retries else "")
        ]
        if self.llm_calls:
            hit = f"{self.cache_hit_rate:.0%}" if self.cache_hit_rate is not None else "n/a"
            out.append(
                f"LLM: {counted(self.llm_calls, 'call')}, {self.tokens_in} in / "
                f"{self.tokens_out} out tokens, cache hit {hit}, {_secs(self.llm_wall_s)} in "
                f"flight (queue {_secs(self.llm_queue_s)})"
            )
        if self.tool_calls:
            out.append(
                f"tools: {counted(self.tool_calls, 'call')}, {_secs(self.tool_wall_s)} running "
                f"({_secs(self.tool_time_s)} summed)"
            )
        if self.result_cache_hits:
            saved = self.result_cache_saved_tokens
            out.append(
                f"result cache: {self.result_cache_hits} hits"
                + (f", {saved} tokens saved" if saved else "")
            )
        if self.critical_path:
            path = " → ".join(s.node for s in self.critical_path)
            out.append(f"critical path: {path} ({_secs(self.critical_path_s)} in nodes)")
        return out


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 call`, `2 calls`: a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _secs(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def summarize_run(
    events: Sequence[Event], *, deps: Mapping[str, Iterable[str]] | None = None
) -> RunSummary:
    """The summary of one run from its events, in journal order.

    The critical path is walked back from the top-level node that finished last: each
    step's predecessor is the node it waited for, that is, among its dependencies (`deps`:
    node id → the node ids it reads, e.g. from the compiled graph) the one that finished
    last; without `deps`, the node that finished last before it became ready.
    """
    if not events:
        raise ValueError("no events: nothing to summarize")
    first = events[0]
    origin = first.ts
    summary = RunSummary(
        run_id=first.run_id, graph=None, status=None, total_s=events[-1].ts - origin
    )
    ready: dict[str, float] = {}
    started: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}  # finished top-level nodes
    llm_open: dict[str, float] = {}
    llm_intervals: list[tuple[float, float]] = []
    tool_open: dict[str, float] = {}
    tool_intervals: list[tuple[float, float]] = []
    for e in events:
        if isinstance(e, RunStarted):
            if summary.graph is None:
                summary.graph = e.graph
            if e.resumed:
                summary.resumes += 1
        elif isinstance(e, NodeReady):
            ready[e.node] = e.ts
        elif isinstance(e, NodeStarted):
            started.setdefault(e.node, e.ts)
        elif isinstance(e, NodeFinished):
            summary.nodes_finished += 1
            if _top_level(e.node):
                spans[e.node] = (started.pop(e.node, e.ts - e.duration_s), e.ts)
        elif isinstance(e, NodeFailed):
            summary.nodes_failed += 1
        elif isinstance(e, NodeSkipped):
            summary.nodes_skipped += 1
        elif isinstance(e, NodeRetrying):
            summary.retries += 1
        elif isinstance(e, LLMCallQueued):
            llm_open[e.call_id] = e.ts
        elif isinstance(e, LLMCallDispatched):
            summary.llm_queue_s += e.queue_wait_s
        elif isinstance(e, LLMCallFinished):
            summary.llm_calls += 1
            summary.llm_errors += e.error is not None
            summary.tokens_in += e.prompt_tokens
            summary.tokens_out += e.completion_tokens
            summary.cached_tokens += e.cached_prompt_tokens
            summary.llm_time_s += e.duration_s
            llm_intervals.append((llm_open.pop(e.call_id, e.ts - e.duration_s), e.ts))
        elif isinstance(e, ToolCallStarted):
            tool_open[e.call_id] = e.ts
        elif isinstance(e, ToolCallFinished):
            summary.tool_calls += 1
            summary.tool_errors += not e.ok
            summary.tool_time_s += e.duration_s
            tool_intervals.append((tool_open.pop(e.call_id, e.ts - e.duration_s), e.ts))
        elif isinstance(e, CacheHit):
            summary.result_cache_hits += 1
            summary.result_cache_saved_tokens += e.saved_tokens
        elif isinstance(e, RunFinished):
            summary.status = e.status
    if summary.tokens_in:
        summary.cache_hit_rate = summary.cached_tokens / summary.tokens_in
    summary.llm_wall_s = _union_length(llm_intervals)
    summary.tool_wall_s = _union_length(tool_intervals)
    summary.critical_path = [
        CriticalStep(node, spans[node][0] - origin, spans[node][1] - origin)
        for node in _critical_path(spans, ready, deps)
    ]
    return summary


def graph_deps(cg: CompiledGraph) -> dict[str, tuple[str, ...]]:
    """What each top-level node of a compiled graph waits for: the `deps` that make
    `summarize_run`'s critical path exact."""
    return {nid: tuple(node.deps) for nid, node in cg.nodes.items()}


def _top_level(node: str) -> bool:
    return "/" not in node and "[" not in node


def _critical_path(
    spans: Mapping[str, tuple[float, float]],
    ready: Mapping[str, float],
    deps: Mapping[str, Iterable[str]] | None,
) -> list[str]:
    if not spans:
        return []
    node: str | None = max(spans, key=lambda n: spans[n][1])
    path: list[str] = []
    seen: set[str] = set()
    while node is not None and node not in seen:
        seen.add(node)
        path.append(node)
        start = spans[node][0]
        if deps is not None:
            candidates = [d for d in deps.get(node, ()) if d in spans]
        else:
            # it became ready when the last thing it waited for finished
            limit = ready.get(node, start)
            candidates = [n for n, (_, end) in spans.items() if end <= limit and n not in seen]
        node = max(candidates, key=lambda n: spans[n][1]) if candidates else None
    path.reverse()
    return path


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total = 0.0
    end = -math.inf
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total
