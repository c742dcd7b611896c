"""The span tree the OpenTelemetry listener builds: parents, names, attributes, timestamps,
errors, retries, nesting of map elements / subgraphs / planner tasks, trace parents."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from obs_sample import SAMPLE_INPUTS, Journal, sample_backend, sample_graph
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as semconv
from opentelemetry.trace import StatusCode

from treadle import Backend, BackendError, Capabilities, Graph, LLMRequest, LLMResponse, Runtime
from treadle.runtime.core.events import (
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
    NodeFailed,
    NodeFinished,
    NodeReady,
    NodeStarted,
    PinReleased,
    PinSet,
    RunFinished,
    RunStarted,
    ToolCallFinished,
    ToolCallStarted,
)
from treadle.runtime.observe import tracing
from treadle.runtime.observe.tracing import OtelTracer
from treadle.runtime.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


class Tree:
    """Finished spans with lookups by name / node and by parent."""

    def __init__(self, spans: Sequence[ReadableSpan]):
        self.spans = list(spans)
        self.by_id = {s.context.span_id: s for s in self.spans}

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def op(self, operation: str) -> list[ReadableSpan]:
        """The spans of one GenAI operation (`invoke_workflow`, `chat`, `execute_tool`)."""
        return [s for s in self.spans if attr(s, "gen_ai.operation.name") == operation]

    def node(self, node: str) -> ReadableSpan:
        (span,) = [s for s in self.named("node") if attr(s, "treadle.node") == node]
        return span

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(span.parent.span_id) if span.parent is not None else None

    def children(self, span: ReadableSpan) -> list[ReadableSpan]:
        return [s for s in self.spans if s.parent and s.parent.span_id == span.context.span_id]


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def ns(ts: float) -> int:
    return int(ts * 1e9)


async def run_sample(tracer: OtelTracer) -> tuple[Any, Tree]:
    runtime = Runtime(models={"default": sample_backend()}, listeners=[tracer.listener])
    result = await runtime.run(sample_graph(), SAMPLE_INPUTS)
    return result, Tree(exporter_of(tracer).get_finished_spans())


_EXPORTERS: dict[int, InMemorySpanExporter] = {}


def memory_tracer() -> OtelTracer:
    tracer, exporter = OtelTracer.in_memory()
    _EXPORTERS[id(tracer)] = exporter
    return tracer


def exporter_of(tracer: OtelTracer) -> InMemorySpanExporter:
    return _EXPORTERS[id(tracer)]


async def test_span_tree_of_a_sample_run() -> None:
    tracer = memory_tracer()
    result, tree = await run_sample(tracer)
    assert result.ok
    (run,) = tree.op("invoke_workflow")
    assert run.parent is None
    assert attr(run, "treadle.run_id") == result.run_id
    assert attr(run, "treadle.graph") == "sample"
    assert attr(run, semconv.GEN_AI_OPERATION_NAME) == "invoke_workflow"
    assert attr(run, "treadle.status") == "succeeded"
    assert run.status.status_code is StatusCode.UNSET
    # every span is in the run's trace, and every node event has its span
    assert {s.context.trace_id for s in tree.spans} == {run.context.trace_id}
    started = {e.node for e in result.events if isinstance(e, NodeStarted)}
    assert {attr(s, "treadle.node") for s in tree.named("node")} == started

    for top in ("flaky", "items", "fan", "sub", "ask", "boom"):
        assert tree.parent(tree.node(top)) is run, top
    # map elements under the map node, the subgraph's nodes under each element
    fan = tree.node("fan")
    elements = sorted(attr(s, "treadle.node") for s in tree.children(fan))
    assert elements == ["fan[0]", "fan[1]", "fan[2]"]
    for i in range(3):
        element = tree.node(f"fan[{i}]")
        assert [attr(s, "treadle.node") for s in tree.children(element)] == [f"fan[{i}]/d"]
    assert tree.parent(tree.node("sub/d")) is tree.node("sub")
    # the LLM node: two llm.call spans and two tool.call spans, all children of the node
    ask = tree.node("ask")
    kids = sorted(tree.children(ask), key=lambda s: s.start_time or 0)
    assert [s.name for s in kids] == [
        "chat default",  # the scripted model has no model name: the alias stands for it
        "execute_tool lookup",
        "execute_tool lookup",
        "chat default",
    ]
    assert {attr(s, semconv.GEN_AI_TOOL_NAME) for s in kids[1:3]} == {"lookup"}
    assert all(attr(s, semconv.GEN_AI_OPERATION_NAME) == "execute_tool" for s in kids[1:3])
    assert all(str(attr(s, semconv.GEN_AI_TOOL_CALL_ID)).startswith("call_") for s in kids[1:3])


async def test_llm_call_attributes_follow_genai_conventions() -> None:
    tracer = memory_tracer()
    result, tree = await run_sample(tracer)
    finished = [e for e in result.events if isinstance(e, LLMCallFinished)]
    spans = {attr(s, "treadle.call_id"): s for s in tree.op("chat")}
    assert set(spans) == {e.call_id for e in finished}
    for event in finished:
        span = spans[event.call_id]
        assert attr(span, semconv.GEN_AI_OPERATION_NAME) == "chat"
        assert attr(span, semconv.GEN_AI_REQUEST_MODEL) == "default"
        assert attr(span, semconv.GEN_AI_USAGE_INPUT_TOKENS) == event.prompt_tokens > 0
        assert attr(span, semconv.GEN_AI_USAGE_OUTPUT_TOKENS) == event.completion_tokens > 0
        assert attr(span, "treadle.prefix_hit_tokens") == event.cached_prompt_tokens
        assert attr(span, "treadle.tool_calls") == event.tool_calls
        assert attr(span, "treadle.node") == "ask"
        assert isinstance(attr(span, "treadle.queue_wait_s"), float)
        assert [e.name for e in span.events] == ["dispatched"]
    # the spans carry the events' own times
    queued = {e.call_id: e for e in result.events if isinstance(e, LLMCallQueued)}
    for event in finished:
        assert spans[event.call_id].start_time == ns(queued[event.call_id].ts)
        assert spans[event.call_id].end_time == ns(event.ts)
    node_done = next(e for e in result.events if isinstance(e, NodeFinished) and e.node == "ask")
    assert tree.node("ask").end_time == ns(node_done.ts)


def test_attribute_names_match_the_installed_semantic_conventions() -> None:
    for ours, theirs in [
        (tracing.GEN_AI_OPERATION_NAME, semconv.GEN_AI_OPERATION_NAME),
        (tracing.GEN_AI_REQUEST_MODEL, semconv.GEN_AI_REQUEST_MODEL),
        (tracing.GEN_AI_USAGE_INPUT_TOKENS, semconv.GEN_AI_USAGE_INPUT_TOKENS),
        (tracing.GEN_AI_USAGE_OUTPUT_TOKENS, semconv.GEN_AI_USAGE_OUTPUT_TOKENS),
        (
            tracing.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
            semconv.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        ),
        (tracing.GEN_AI_RESPONSE_FINISH_REASONS, semconv.GEN_AI_RESPONSE_FINISH_REASONS),
        (
            tracing.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
            semconv.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
        ),
        (tracing.GEN_AI_TOOL_NAME, semconv.GEN_AI_TOOL_NAME),
        (tracing.GEN_AI_TOOL_CALL_ID, semconv.GEN_AI_TOOL_CALL_ID),
        (tracing.GEN_AI_WORKFLOW_NAME, semconv.GEN_AI_WORKFLOW_NAME),
        (tracing.GEN_AI_CONVERSATION_ID, semconv.GEN_AI_CONVERSATION_ID),
    ]:
        assert ours == theirs


async def test_retry_is_one_span_with_a_retry_event() -> None:
    tracer = memory_tracer()
    _, tree = await run_sample(tracer)
    flaky = tree.node("flaky")
    assert attr(flaky, "treadle.attempt") == 2
    assert attr(flaky, "treadle.retries") == 1
    (retry,) = [e for e in flaky.events if e.name == "retry"]
    assert retry.attributes is not None
    assert retry.attributes["treadle.attempt"] == 1
    assert "ConnectionError: transient" in str(retry.attributes["treadle.error"])
    assert flaky.status.status_code is StatusCode.UNSET  # the second attempt succeeded


async def test_failed_nodes_and_runs_have_error_status() -> None:
    tracer = memory_tracer()
    _, tree = await run_sample(tracer)
    boom = tree.node("boom")  # on_error="skip": failed, then skipped
    assert boom.status.status_code is StatusCode.ERROR
    assert "RuntimeError: nope" in (boom.status.description or "")
    assert attr(boom, "treadle.error_policy") == "skip"
    assert attr(boom, "treadle.status") == "skipped"

    def fail(x: int) -> int:
        raise ValueError("bad value")

    g = Graph("failing", inputs={"x": int})
    g.output(out=g.func("bad", fail, inputs={"x": g.input.x}).out)
    tracer = memory_tracer()
    result = await Runtime(listeners=[tracer.listener]).run(g, {"x": 1}, check=False)
    assert result.status == "failed"
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (run,) = tree.op("invoke_workflow")
    assert run.status.status_code is StatusCode.ERROR
    assert "bad value" in (run.status.description or "")
    assert tree.node("bad").status.status_code is StatusCode.ERROR
    assert attr(tree.node("bad"), "error.type") == "node_failed"
    assert tracer.open_runs() == []


class FailingBackend:
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def generate(self, request: LLMRequest) -> LLMResponse:
        raise BackendError("engine is down", replica="gpu-3")


async def test_backend_error_marks_the_llm_call() -> None:
    assert isinstance(FailingBackend(), Backend)
    g = Graph("llm-fails", inputs={"q": str})
    g.output(a=g.llm("ask", "{q}", inputs={"q": g.input.q}).out)
    tracer = memory_tracer()
    runtime = Runtime(models={"default": FailingBackend()}, listeners=[tracer.listener])
    result = await runtime.run(g, {"q": "hi"}, check=False)
    assert result.status == "failed"
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (call,) = tree.op("chat")
    assert call.status.status_code is StatusCode.ERROR
    assert attr(call, "error.type") == "backend_error"
    assert attr(call, "treadle.replica") == "gpu-3"
    assert tree.parent(call) is tree.node("ask")


async def test_a_tool_call_cut_off_by_its_node_timeout_is_an_error_span() -> None:
    """14.2: the node's timeout ends the tool call; its span says so (status ERROR)."""
    import anyio

    from treadle import tool

    @tool
    async def slow(x: int) -> int:
        """Slow."""
        await anyio.sleep(30)
        return x

    g = Graph("cutoff", inputs={"x": int})
    g.output(out=g.tool("t", slow, inputs={"x": g.input.x}, timeout_s=0.05).out)
    tracer = memory_tracer()
    result = await Runtime(listeners=[tracer.listener]).run(g, {"x": 1}, check=False)
    assert result.status == "failed"
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (call,) = [s for s in tree.spans if attr(s, semconv.GEN_AI_TOOL_NAME) == "slow"]
    assert call.status.status_code is StatusCode.ERROR
    assert "cancelled" in (call.status.description or "")
    assert tree.parent(call) is tree.node("t")


async def test_run_joins_a_given_traceparent() -> None:
    tracer = memory_tracer()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    g = Graph("tiny", inputs={"x": int})
    g.output(out=g.func("a", lambda x: x + 1, inputs={"x": g.input.x}).out)
    runtime = Runtime(listeners=[tracer.listener])
    tracer.set_parent("fixed-run", parent)
    await runtime.run(g, {"x": 1}, run_id="fixed-run")
    (run,) = Tree(exporter_of(tracer).get_finished_spans()).op("invoke_workflow")
    assert run.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert run.parent is not None and run.parent.span_id == 0xB7AD6B7169203331
    assert run.parent.is_remote


def test_run_span_times_and_tenant_come_from_the_events() -> None:
    tracer = memory_tracer()
    ctx = SimpleNamespace(options=SimpleNamespace(tenant="acme"), call_headers={})
    j = Journal("tenant-run")
    for event in (
        j.at(0, RunStarted, graph="g"),
        j.at(1, RunFinished, status="succeeded", duration_s=1.0),
    ):
        tracer.listener(ctx, event)
    (run,) = exporter_of(tracer).get_finished_spans()
    assert attr(run, "treadle.tenant") == "acme"
    assert (run.start_time, run.end_time) == (ns(j.events[0].ts), ns(j.events[1].ts))


async def test_run_started_inside_a_span_is_its_child() -> None:
    tracer = memory_tracer()
    g = Graph("tiny", inputs={"x": int})
    g.output(out=g.func("a", lambda x: x + 1, inputs={"x": g.input.x}).out)
    runtime = Runtime(listeners=[tracer.listener])
    with tracer.tracer.start_as_current_span("request") as outer:
        await runtime.run(g, {"x": 1})
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (run,) = tree.op("invoke_workflow")
    assert run.parent is not None and run.parent.span_id == outer.get_span_context().span_id


def test_invalid_traceparent_is_a_clear_error() -> None:
    tracer = memory_tracer()
    with pytest.raises(ValueError, match="not a valid W3C traceparent"):
        tracer.set_parent("r", "00-nothex-01")


async def test_replay_of_a_stored_journal_builds_the_same_tree() -> None:
    store = MemoryStore()
    live = memory_tracer()
    runtime = Runtime(store=store, models={"default": sample_backend()}, listeners=[live.listener])
    result = await runtime.run(sample_graph(), SAMPLE_INPUTS)
    replayed = memory_tracer()
    replayed.replay(await store.read_events(result.run_id))

    def shape(tracer: OtelTracer) -> list[tuple[str, Any, Any, int, int]]:
        tree = Tree(exporter_of(tracer).get_finished_spans())
        out = []
        for s in tree.spans:
            p = tree.parent(s)
            key = attr(s, "treadle.call_id") or attr(s, "treadle.node")
            parent_key = None if p is None else attr(p, "treadle.node")
            out.append((s.name, key, parent_key, s.start_time or 0, s.end_time or 0))
        return sorted(out, key=str)

    assert shape(replayed) == shape(live)


def test_replay_of_an_unfinished_journal_closes_what_is_open() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0.1, NodeReady, node="a")
    j.at(0.2, NodeStarted, node="a")
    j.at(0.3, LLMCallQueued, node="a", call_id="a#1", model="m")
    tracer = memory_tracer()
    tracer.replay(j.events)
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (run,) = tree.op("invoke_workflow")
    assert attr(run, "treadle.status") == "interrupted"
    call = tree.op("chat")[0]
    assert attr(call, "treadle.unfinished") is True
    assert call.end_time == ns(j.events[-1].ts)
    assert attr(tree.node("a"), "treadle.unfinished") is True
    assert tracer.open_runs() == []


def test_planner_tasks_nest_under_the_planner_node() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0.1, NodeStarted, node="plan")
    j.at(0.2, LLMCallQueued, node="plan", call_id="plan#1", model="m")
    j.at(0.3, LLMCallDispatched, node="plan", call_id="plan#1", queue_wait_s=0.1)
    for i in (1, 2):
        j.at(0.3 + i / 10, NodeStarted, node=f"plan/task{i}")
        j.at(0.35 + i / 10, ToolCallStarted, node=f"plan/task{i}", call_id=f"t{i}", tool="s")
        j.at(
            0.4 + i / 10, ToolCallFinished, node=f"plan/task{i}", call_id=f"t{i}", tool="s",
            duration_s=0.05,
        )  # fmt: skip
        j.at(0.45 + i / 10, NodeFinished, node=f"plan/task{i}", duration_s=0.15)
    j.at(0.8, LLMCallFinished, node="plan", call_id="plan#1", model="m", ttft_s=0.05)
    j.at(0.9, NodeFinished, node="plan", duration_s=0.8)
    j.at(1.0, RunFinished, status="succeeded", duration_s=1.0)
    tracer = memory_tracer()
    tracer.replay(j.events)
    tree = Tree(exporter_of(tracer).get_finished_spans())
    plan = tree.node("plan")
    tasks = [s for s in tree.children(plan) if s.name == "node"]
    assert sorted(attr(s, "treadle.node") for s in tasks) == ["plan/task1", "plan/task2"]
    for task in tasks:
        (tool_span,) = tree.children(task)
        assert tool_span.name.startswith("execute_tool ")
    (call,) = tree.op("chat")
    assert attr(call, "treadle.ttft_s") == 0.05
    assert attr(call, semconv.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK) == 0.05
    assert attr(call, "treadle.queue_wait_s") == 0.1


def test_pins_are_spans_linked_to_the_call_that_pinned() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0.1, NodeStarted, node="agent")
    j.at(0.2, LLMCallQueued, node="agent", call_id="agent#1", model="m")
    j.at(0.3, PinSet, node="agent", call_id="agent#1", ttl_s=2.5, tokens=4096)
    j.at(0.4, LLMCallFinished, node="agent", call_id="agent#1", model="m")
    j.at(0.5, ToolCallStarted, node="agent", call_id="agent:c1", tool="run_tests")
    j.at(1.5, ToolCallFinished, node="agent", call_id="agent:c1", tool="run_tests", duration_s=1)
    j.at(1.6, PinReleased, node="agent", call_id="agent#1", reason="next_call", used=True)
    j.at(2.0, NodeFinished, node="agent", duration_s=1.9)
    j.at(2.1, RunFinished, status="succeeded", duration_s=2.1)
    tracer = memory_tracer()
    tracer.replay(j.events)
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (pin,) = tree.named("kv.pin")
    (call,) = tree.op("chat")
    assert tree.parent(pin) is tree.node("agent")
    assert [link.context.span_id for link in pin.links] == [call.context.span_id]
    assert attr(pin, "treadle.pin_ttl_s") == 2.5
    assert attr(pin, "treadle.pin_tokens") == 4096
    assert attr(pin, "treadle.pin_used") is True
    assert attr(pin, "treadle.pin_release_reason") == "next_call"
    assert (pin.start_time, pin.end_time) == (ns(j.events[3].ts), ns(j.events[7].ts))
    assert attr(call, "treadle.pin_ttl_s") == 2.5


async def test_sampled_out_runs_make_no_spans_but_still_propagate() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = OtelTracer(provider)
    seen: list[dict[str, str]] = []

    class Recorder:
        @property
        def capabilities(self) -> Capabilities:
            return Capabilities()

        async def generate(self, request: LLMRequest) -> LLMResponse:
            seen.append(dict(request.headers))
            return LLMResponse(content="ok")

    g = Graph("sampled", inputs={"q": str})
    g.output(a=g.llm("ask", "{q}", inputs={"q": g.input.q}).out)
    await Runtime(models={"default": Recorder()}, listeners=[tracer.listener]).run(g, {"q": "x"})
    assert exporter.get_finished_spans() == ()
    (headers,) = seen
    flags = int(headers["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 0x01 == 0  # not sampled, but the context still travels


def test_events_for_an_unknown_run_start_its_span_lazily() -> None:
    # a listener added to a run already under way still traces what it sees
    j = Journal()
    j.at(0.0, NodeStarted, node="a")
    j.at(0.5, NodeFinished, node="a", duration_s=0.5)
    j.at(1.0, RunFinished, status="succeeded", duration_s=1.0)
    tracer = memory_tracer()
    ctx = SimpleNamespace(options=SimpleNamespace(tenant=None), call_headers={})
    for event in j.events:
        tracer.listener(ctx, event)
    tree = Tree(exporter_of(tracer).get_finished_spans())
    (run,) = tree.op("invoke_workflow")
    assert tree.parent(tree.node("a")) is run
    assert run.start_time == ns(j.events[0].ts)


def test_no_global_provider_is_touched() -> None:
    before = trace.get_tracer_provider()
    memory_tracer()
    assert trace.get_tracer_provider() is before


async def test_a_real_planner_run_nests_its_tasks() -> None:
    from obs_sample import lookup

    from treadle import ScriptedBackend, ScriptRule

    g = Graph("plan", inputs={"q": str})
    g.output(a=g.planner("plan", "Question: {q}", tools=[lookup], inputs={"q": g.input.q}).out)
    backend = ScriptedBackend(
        [
            ScriptRule(match="Question: .*Observation", content="Thought: ok\nAction: Finish(ok)"),
            ScriptRule(
                match="Question:",
                content='1. lookup("Oslo")\n2. lookup("Rome")\n3. join()\n<END_OF_PLAN>',
            ),
        ]
    )
    tracer = memory_tracer()
    result = await Runtime(models={"default": backend}, listeners=[tracer.listener]).run(
        g, {"q": "weather?"}
    )
    assert result.ok
    tree = Tree(exporter_of(tracer).get_finished_spans())
    plan = tree.node("plan")
    tasks = sorted(attr(s, "treadle.node") for s in tree.children(plan) if s.name == "node")
    assert tasks == ["plan/task1", "plan/task2"]
    for task in tasks:
        (tool_span,) = tree.children(tree.node(task))
        assert attr(tool_span, "gen_ai.operation.name") == "execute_tool"
    assert {s.name for s in tree.children(plan)} == {"node", "chat default"}


def test_a_failure_handed_to_the_joiner_ends_the_task_span_there() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0, NodeStarted, node="plan")
    j.at(0.1, NodeStarted, node="plan/task1")
    j.at(0.2, NodeFailed, node="plan/task1", error="disk on fire", policy="observe")
    j.at(1.0, NodeFinished, node="plan", duration_s=1.0)
    j.at(1.0, RunFinished, status="succeeded", duration_s=1.0)
    tracer = memory_tracer()
    tracer.replay(j.events)
    task = Tree(exporter_of(tracer).get_finished_spans()).node("plan/task1")
    assert task.end_time == ns(j.events[3].ts)
    assert task.status.status_code is StatusCode.ERROR
    assert attr(task, "treadle.unfinished") is None


def test_a_resumed_journal_gives_two_linked_run_spans() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0, NodeStarted, node="a")
    j.at(2, NodeStarted, node="b")  # the process dies after this
    j.at(30, RunStarted, graph="g", resumed=True)
    j.at(30, NodeStarted, node="b")
    j.at(31, NodeFinished, node="b", duration_s=1)
    j.at(31, RunFinished, status="succeeded", duration_s=1)
    tracer = memory_tracer()
    tracer.replay(j.events)
    tree = Tree(exporter_of(tracer).get_finished_spans())
    first, second = sorted(tree.op("invoke_workflow"), key=lambda s: s.start_time or 0)
    assert attr(first, "treadle.status") == "interrupted"
    assert first.end_time == ns(j.events[2].ts)  # where its journal stops
    assert attr(second, "treadle.resumed") is True
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    b_spans = [s for s in tree.named("node") if attr(s, "treadle.node") == "b"]
    assert sorted(attr(s, "treadle.unfinished") is True for s in b_spans) == [False, True]


_HAS_FINISH_REASON = "finish_reason" in {f.name for f in dataclasses.fields(LLMCallFinished)}


@pytest.mark.skipif(not _HAS_FINISH_REASON, reason="LLMCallFinished has no finish_reason yet")
async def test_finish_reasons_are_recorded() -> None:
    tracer = memory_tracer()
    _, tree = await run_sample(tracer)
    calls = sorted(tree.op("chat"), key=lambda s: s.start_time or 0)
    reasons = [attr(s, semconv.GEN_AI_RESPONSE_FINISH_REASONS) for s in calls]
    assert reasons == [("tool_calls",), ("stop",)]


def test_events_after_the_end_of_a_run_open_no_second_run_span() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0.1, NodeStarted, node="a")
    j.at(0.2, PinSet, node="a", call_id="a#1", ttl_s=1.0)
    j.at(0.5, NodeFinished, node="a", duration_s=0.4)
    j.at(0.6, RunFinished, status="succeeded", duration_s=0.6)
    j.at(0.7, PinReleased, node="a", call_id="a#1", reason="run_end")  # a straggler
    ctx = SimpleNamespace(options=SimpleNamespace(tenant=None), call_headers={})
    live = memory_tracer()
    for event in j.events:
        live.listener(ctx, event)
    replayed = memory_tracer()
    replayed.replay(j.events)
    for tracer in (live, replayed):
        tree = Tree(exporter_of(tracer).get_finished_spans())
        assert len(tree.op("invoke_workflow")) == 1
        (pin,) = tree.named("kv.pin")
        assert attr(pin, "treadle.unfinished") is True  # cut at the run's end
        assert tracer.open_runs() == []
