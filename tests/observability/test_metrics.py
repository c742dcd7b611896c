"""Prometheus series after known runs, and the gauge registry other components use."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from obs_sample import SAMPLE_INPUTS, Journal, sample_backend, sample_graph
from prometheus_client.parser import text_string_to_metric_families

from treadle import Runtime
from treadle.runtime.core.events import (
    LLMCallDispatched,
    LLMCallFinished,
    LLMCallQueued,
    NodeFinished,
    PinReleased,
    PinSet,
    RunFinished,
    RunStarted,
    ToolCallFinished,
)
from treadle.runtime.observe.metrics import RuntimeMetrics

pytestmark = pytest.mark.anyio


def value(metrics: RuntimeMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_counts_after_a_known_run() -> None:
    metrics = RuntimeMetrics()
    runtime = Runtime(models={"default": sample_backend()}, listeners=[metrics.listener])
    result = await runtime.run(sample_graph(), SAMPLE_INPUTS, tenant="acme")
    events = result.events
    run = {"graph": "sample", "tenant": "acme"}
    assert value(metrics, "treadle_runs_started_total", **run) == 1
    assert value(metrics, "treadle_runs_finished_total", **run, status="succeeded") == 1
    assert value(metrics, "treadle_runs_active", tenant="acme") == 0
    assert (
        value(metrics, "treadle_run_duration_seconds_count", graph="sample", status="succeeded")
        == 1
    )

    finished = sum(isinstance(e, NodeFinished) for e in events)
    # flaky, items, fan, 3 elements and their 3 inner nodes, sub, sub/d, ask = 12
    assert finished == 12
    assert value(metrics, "treadle_nodes_total", outcome="finished") == finished
    assert value(metrics, "treadle_node_duration_seconds_count") == finished
    assert value(metrics, "treadle_nodes_total", outcome="failed") == 1  # boom
    assert value(metrics, "treadle_nodes_total", outcome="skipped") == 1  # boom, skip policy
    assert value(metrics, "treadle_node_retries_total") == 1  # flaky

    calls = [e for e in events if isinstance(e, LLMCallFinished)]
    assert len(calls) == 2
    ok = {"model": "default", "replica": "", "outcome": "ok"}
    assert value(metrics, "treadle_llm_calls_total", **ok) == 2
    assert value(metrics, "treadle_llm_queue_wait_seconds_count", model="default") == 2
    assert value(metrics, "treadle_llm_call_duration_seconds_count", model="default") == 2
    tokens = {"model": "default", "tenant": "acme"}
    assert value(metrics, "treadle_llm_tokens_total", **tokens, type="input") == sum(
        e.prompt_tokens for e in calls
    )
    assert value(metrics, "treadle_llm_tokens_total", **tokens, type="output") == sum(
        e.completion_tokens for e in calls
    )
    assert value(metrics, "treadle_tool_calls_total", tool="lookup", outcome="ok") == 2
    assert value(metrics, "treadle_tool_duration_seconds_count", tool="lookup") == 2
    assert value(metrics, "treadle_tool_duration_seconds_sum", tool="lookup") == pytest.approx(
        sum(e.duration_s for e in events if isinstance(e, ToolCallFinished))
    )
    # the exposition parses, and the series are there
    families = {f.name for f in text_string_to_metric_families(metrics.render())}
    assert {"treadle_runs_started", "treadle_llm_tokens", "treadle_tool_duration_seconds"} <= (
        families
    )
    assert metrics.content_type.startswith("text/plain")


def test_llm_timings_tokens_and_cache_hits_from_events() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0.1, LLMCallQueued, node="a", call_id="a#1", model="big")
    j.at(0.35, LLMCallDispatched, node="a", call_id="a#1", queue_wait_s=0.25, replica="r0")
    j.at(
        1.0, LLMCallFinished, node="a", call_id="a#1", model="big", prompt_tokens=1000,
        completion_tokens=50, cached_prompt_tokens=768, duration_s=0.65, ttft_s=0.2,
        replica="r0",
    )  # fmt: skip
    j.at(1.1, LLMCallQueued, node="a", call_id="a#2", model="big")
    j.at(1.2, LLMCallDispatched, node="a", call_id="a#2", queue_wait_s=0.1)
    j.at(1.5, LLMCallFinished, node="a", call_id="a#2", model="big", error="boom", duration_s=0.3)
    j.at(2.0, RunFinished, status="failed", error="boom", duration_s=2.0)
    metrics = RuntimeMetrics()
    for event in j.events:
        metrics.observe(event, tenant="t1")
    assert value(metrics, "treadle_llm_queue_wait_seconds_sum", model="big") == pytest.approx(0.35)
    assert value(metrics, "treadle_llm_ttft_seconds_count", model="big") == 1
    assert value(metrics, "treadle_llm_ttft_seconds_sum", model="big") == pytest.approx(0.2)
    assert (
        value(metrics, "treadle_llm_tokens_total", model="big", tenant="t1", type="cached") == 768
    )
    assert value(metrics, "treadle_llm_cache_hit_calls_total", model="big") == 1
    assert value(metrics, "treadle_llm_calls_total", model="big", replica="r0", outcome="ok") == 1
    assert value(metrics, "treadle_llm_calls_total", model="big", replica="", outcome="error") == 1
    assert (
        value(metrics, "treadle_runs_finished_total", graph="g", tenant="t1", status="failed") == 1
    )


def test_pins_active_expired_and_used() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0.1, PinSet, node="a", call_id="a#1", ttl_s=2.0, tokens=100)
    j.at(0.2, PinSet, node="b", call_id="b#1", ttl_s=5.0, tokens=100)
    j.at(0.3, PinSet, node="c", call_id="c#1", ttl_s=1.0, tokens=100)
    metrics = RuntimeMetrics()
    for event in j.events:
        metrics.observe(event)
    assert value(metrics, "treadle_pins_active") == 3
    j.at(1.0, PinReleased, node="a", call_id="a#1", reason="next_call", used=True)
    j.at(2.3, PinReleased, node="c", call_id="c#1", reason="expired", used=False)
    j.at(2.4, PinReleased, node="c", call_id="c#1", reason="expired", used=False)  # repeated
    for event in j.events[-3:]:
        metrics.observe(event)
    assert value(metrics, "treadle_pins_active") == 1
    assert value(metrics, "treadle_pins_set_total") == 3
    assert value(metrics, "treadle_pins_released_total", reason="next_call", used="true") == 1
    assert value(metrics, "treadle_pins_released_total", reason="expired", used="false") == 2
    assert value(metrics, "treadle_pin_ttl_seconds_sum") == pytest.approx(8.0)
    # the run ends holding b's pin: the gauge does not drift
    metrics.observe(j.at(3.0, RunFinished, status="succeeded", duration_s=3.0))
    assert value(metrics, "treadle_pins_active") == 0
    assert value(metrics, "treadle_runs_active", tenant="") == 0


def test_gauges_for_the_scheduler() -> None:
    metrics = RuntimeMetrics()
    depth = metrics.gauge("treadle_scheduler_queue_depth", "Calls queued per tenant.", ["tenant"])
    depth.labels("acme").set(7)
    assert metrics.gauge("treadle_scheduler_queue_depth", "again", ["tenant"]) is depth
    with pytest.raises(ValueError, match="already exists with labels"):
        metrics.gauge("treadle_scheduler_queue_depth", "x", ["replica"])
    in_flight: dict[tuple[str, ...], float] = {("r0",): 3, ("r1",): 5}
    metrics.gauge_callback(
        "treadle_scheduler_in_flight", "Calls in flight per replica.", lambda: in_flight,
        ["replica"],
    )  # fmt: skip
    metrics.gauge_callback("treadle_scheduler_admitted_runs", "Runs admitted.", lambda: 2)
    assert value(metrics, "treadle_scheduler_queue_depth", tenant="acme") == 7
    assert value(metrics, "treadle_scheduler_in_flight", replica="r1") == 5
    in_flight[("r1",)] = 1  # read at scrape time
    assert value(metrics, "treadle_scheduler_in_flight", replica="r1") == 1
    assert value(metrics, "treadle_scheduler_admitted_runs") == 2
    assert "treadle_scheduler_in_flight" in metrics.render()
    with pytest.raises(ValueError, match="already registered"):
        metrics.gauge_callback("treadle_scheduler_in_flight", "x", lambda: 0)
    metrics.remove_gauge_callback("treadle_scheduler_in_flight")
    assert "treadle_scheduler_in_flight" not in metrics.render()
    in_flight[("r0", "extra")] = 1
    metrics.gauge_callback("treadle_bad", "labels mismatch", lambda: in_flight, ["replica"])
    with pytest.raises(ValueError, match="do not match"):
        metrics.render()


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = RuntimeMetrics(), RuntimeMetrics()
    a.observe(Journal().at(0, RunStarted, graph="g"))
    assert value(a, "treadle_runs_started_total", graph="g", tenant="") == 1
    assert value(b, "treadle_runs_started_total", graph="g", tenant="") == 0


async def test_calls_in_flight_interceptor_counts_calls_under_way() -> None:
    from treadle import Graph, LLMRequest, LLMResponse, tool
    from treadle.backends.base import Capabilities

    metrics = RuntimeMetrics()
    during: list[float] = []

    def in_flight(call: str, name: str) -> float:
        labels = {"call": call, "name": name}
        return metrics.registry.get_sample_value("treadle_calls_in_flight", labels) or 0.0

    class Watching:
        capabilities = Capabilities()

        async def generate(self, request: LLMRequest) -> LLMResponse:
            during.append(in_flight("llm", "default"))
            return LLMResponse(content="ok")

    @tool
    def probe(x: str) -> float:
        """Read the gauge while the tool runs."""
        return in_flight("tool", "probe")

    g = Graph("inflight", inputs={"q": str})
    g.output(
        a=g.llm("ask", "{q}", inputs={"q": g.input.q}).out,
        t=g.tool("t", probe, inputs={"x": g.input.q}).out,
    )
    runtime = Runtime(models={"default": Watching()}, interceptors=[metrics.calls_in_flight()])
    result = await runtime.run(g, {"q": "x"})
    assert during == [1.0] and result.output.t == 1.0
    assert in_flight("llm", "default") == in_flight("tool", "probe") == 0.0
