"""The run summary and the timeline model from journals with known times, their rendering,
and the `treadle trace` output (waterfall and JSON)."""

from __future__ import annotations

import io
import json
from itertools import pairwise

import pytest
from obs_sample import SAMPLE_INPUTS, Journal, sample_backend, sample_graph
from rich.console import Console

from treadle import Runtime
from treadle.cli.trace_view import render_timeline, trace_command
from treadle.runtime.core.events import (
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
from treadle.runtime.observe.metrics import graph_deps, summarize_run
from treadle.runtime.observe.timeline import Row, build_timeline, parent_instance
from treadle.runtime.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


def known_run() -> Journal:
    """a → b (LLM, two overlapping tools, a pin, LLM) → d (map of 2); c retried; e skipped.

    0      1      2      3      4      5  seconds
    a━━━━━━┫
           b━━━━━━━━━━━━━━━━━━━━━┫
           c━━━╌╌╌━━━┫
                                 d━━━━━━┫
                                        e (skipped)
    """
    j = Journal()
    j.at(0.0, RunStarted, graph="known")
    j.at(0.0, NodeReady, node="a")
    j.at(0.0, NodeStarted, node="a")
    j.at(1.0, NodeFinished, node="a", duration_s=1.0)
    j.at(1.0, NodeReady, node="b")
    j.at(1.0, NodeReady, node="c")
    j.at(1.0, NodeStarted, node="b")
    j.at(1.0, NodeStarted, node="c")
    j.at(1.0, LLMCallQueued, node="b", call_id="b#1", model="m")
    j.at(1.25, LLMCallDispatched, node="b", call_id="b#1", queue_wait_s=0.25, replica="r0")
    j.at(1.5, NodeRetrying, node="c", attempt=1, error="flaky", delay_s=0.5)
    j.at(
        2.0, LLMCallFinished, node="b", call_id="b#1", model="m", prompt_tokens=1000,
        completion_tokens=100, cached_prompt_tokens=600, duration_s=0.75, ttft_s=0.25,
        tool_calls=2, replica="r0",
    )  # fmt: skip
    j.at(2.0, PinSet, node="b", call_id="b#1", ttl_s=3.0, tokens=1100)
    j.at(2.0, ToolCallStarted, node="b", call_id="b:c1", tool="search")
    j.at(2.0, NodeStarted, node="c", attempt=2)
    j.at(2.5, ToolCallStarted, node="b", call_id="b:c2", tool="search")
    j.at(2.5, NodeFinished, node="c", duration_s=0.5)
    j.at(3.0, ToolCallFinished, node="b", call_id="b:c1", tool="search", duration_s=1.0)
    j.at(
        3.5, ToolCallFinished, node="b", call_id="b:c2", tool="search", duration_s=1.0,
        ok=False, error="timeout",
    )  # fmt: skip
    j.at(3.5, LLMCallQueued, node="b", call_id="b#2", model="m")
    j.at(3.5, PinReleased, node="b", call_id="b#1", reason="next_call", used=True)
    j.at(3.5, LLMCallDispatched, node="b", call_id="b#2")
    j.at(
        4.0, LLMCallFinished, node="b", call_id="b#2", model="m", prompt_tokens=1200,
        completion_tokens=50, cached_prompt_tokens=1000, duration_s=0.5,
    )  # fmt: skip
    j.at(4.0, NodeFinished, node="b", duration_s=3.0)
    j.at(4.0, NodeReady, node="d")
    j.at(4.0, NodeStarted, node="d")
    j.at(4.0, GraphExtended, node="d", instances=["d[0]", "d[1]"])
    j.at(4.0, NodeStarted, node="d[0]")
    j.at(4.0, NodeStarted, node="d[1]")
    j.at(4.5, NodeFinished, node="d[0]", duration_s=0.5)
    j.at(5.0, NodeFinished, node="d[1]", duration_s=1.0)
    j.at(5.0, NodeFinished, node="d", duration_s=1.0)
    j.at(5.0, NodeSkipped, node="e", reason="branch 'x' chose 'y'")
    j.at(5.0, RunFinished, status="succeeded", duration_s=5.0)
    return j


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-6)


# -- summary -------------------------------------------------------------------------------


def test_summary_numbers_of_a_known_run() -> None:
    s = summarize_run(known_run().events)
    assert (s.run_id, s.graph, s.status) == ("run-1", "known", "succeeded")
    assert s.total_s == approx(5.0)
    assert (s.nodes_finished, s.nodes_failed, s.nodes_skipped, s.retries) == (6, 0, 1, 1)
    assert (s.llm_calls, s.tool_calls, s.tool_errors) == (2, 2, 1)
    assert (s.tokens_in, s.tokens_out, s.cached_tokens) == (2200, 150, 1600)
    assert s.cache_hit_rate == approx(1600 / 2200)
    assert s.llm_time_s == approx(1.25)
    assert s.llm_queue_s == approx(0.25)
    assert s.llm_wall_s == approx(1.5)  # [1, 2] and [3.5, 4]
    assert s.tool_time_s == approx(2.0)
    assert s.tool_wall_s == approx(1.5)  # [2, 3] ∪ [2.5, 3.5]
    assert [step.node for step in s.critical_path] == ["a", "b", "d"]
    assert [(step.start_s, step.end_s) for step in s.critical_path] == [
        (approx(0), approx(1)),
        (approx(1), approx(4)),
        (approx(4), approx(5)),
    ]
    assert s.critical_path_s == approx(5.0)
    text = "\n".join(s.lines())
    assert "critical path: a → b → d" in text
    assert "cache hit 73%" in text
    assert json.loads(json.dumps(s.to_dict()))["critical_path"][1]["node"] == "b"


def test_critical_path_follows_declared_dependencies() -> None:
    # if d had read only c, the chain that decided its start is a → c → d
    deps = {"d": ["c"], "c": ["a"], "b": ["a"]}
    s = summarize_run(known_run().events, deps=deps)
    assert [step.node for step in s.critical_path] == ["a", "c", "d"]


def test_summary_of_an_unfinished_journal_and_of_nothing() -> None:
    j = known_run()
    s = summarize_run(j.events[:12])
    assert s.status is None
    assert s.llm_calls == 1
    with pytest.raises(ValueError, match="no events"):
        summarize_run([])


async def test_summary_of_a_real_run() -> None:
    result = await Runtime(models={"default": sample_backend()}).run(sample_graph(), SAMPLE_INPUTS)
    s = summarize_run(result.events)
    assert s.status == "succeeded"
    assert (s.llm_calls, s.tool_calls, s.retries, s.nodes_skipped) == (2, 2, 1, 1)
    assert s.tokens_in == sum(
        e.prompt_tokens for e in result.events if isinstance(e, LLMCallFinished)
    )
    assert s.critical_path and all("[" not in step.node for step in s.critical_path)
    assert 0 < s.critical_path_s <= s.total_s + 1e-6
    # with the graph's dependencies, each step is one the next one read from
    deps = graph_deps(Runtime().compile(sample_graph()))
    exact = summarize_run(result.events, deps=deps).critical_path
    for before, after in pairwise(exact):
        assert before.node in deps[after.node]
    assert exact[-1].end_s == approx(max(step.end_s for step in s.critical_path))


# -- timeline model ------------------------------------------------------------------------


def rows_by_id(rows: list[Row]) -> dict[str, Row]:
    return {r.id: r for r in rows}


def segs(row: Row) -> list[tuple[str, object, object]]:
    return [(s.kind, approx(s.start_s), approx(s.end_s)) for s in row.segments]


def test_parent_instance() -> None:
    assert parent_instance("a") is None
    assert parent_instance("m[3]") == "m"
    assert parent_instance("sub/x") == "sub"
    assert parent_instance("planner/task2") == "planner"
    assert parent_instance("sub/m[0]") == "sub/m"
    assert parent_instance("m[0]/x") == "m[0]"
    assert parent_instance("m[0][1]") == "m[0]"


def test_timeline_rows_of_a_known_run() -> None:
    tl = build_timeline(known_run().events)
    assert (tl.run_id, tl.graph, tl.status, tl.error) == ("run-1", "known", "succeeded", None)
    assert tl.duration_s == approx(5.0)
    order = [(r.id, r.depth) for r in tl.rows]
    assert order == [
        ("a", 0),
        ("b", 0),
        ("b#1", 1),
        ("b:c1", 1),
        ("pin:b#1", 1),
        ("b:c2", 1),
        ("b#2", 1),
        ("c", 0),
        ("d", 0),
        ("d[0]", 1),
        ("d[1]", 1),
        ("e", 0),
    ]
    rows = rows_by_id(tl.rows)
    assert segs(rows["b#1"]) == [
        ("queue", approx(1.0), approx(1.25)),
        ("prefill", approx(1.25), approx(1.5)),
        ("decode", approx(1.5), approx(2.0)),
    ]
    assert rows["b#1"].detail["cached_tokens"] == 600
    assert rows["b#1"].detail["replica"] == "r0"
    assert segs(rows["b#2"]) == [("call", approx(3.5), approx(4.0))]  # TTFT unknown
    assert segs(rows["c"]) == [
        ("failed", approx(1.0), approx(1.5)),
        ("backoff", approx(1.5), approx(2.0)),
        ("attempt", approx(2.0), approx(2.5)),
    ]
    assert (rows["c"].attempts, rows["c"].status) == (2, "done")
    assert rows["c"].detail["errors"] == ["flaky"]
    assert rows["b:c2"].status == "error" and rows["b:c2"].detail["error"] == "timeout"
    assert segs(rows["b:c2"]) == [("error", approx(2.5), approx(3.5))]
    pin = rows["pin:b#1"]
    assert segs(pin) == [("pin", approx(2.0), approx(3.5))]
    assert pin.detail == {
        "call_id": "b#1",
        "ttl_s": 3.0,
        "tokens": 1100,
        "used": True,
        "reason": "next_call",
    }
    assert rows["d[1]"].parent == "d" and rows["d[1]"].duration_s == approx(1.0)
    assert (rows["e"].status, rows["e"].segments, rows["e"].start_s) == ("skipped", [], approx(5))
    assert [m.kind for m in tl.markers] == ["started", "finished"]


def test_ttft_from_streamed_tokens_when_the_backend_gives_none() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0, NodeStarted, node="a")
    j.at(0, LLMCallQueued, node="a", call_id="a#1", model="m")
    j.at(0.5, LLMCallDispatched, node="a", call_id="a#1", queue_wait_s=0.5)
    j.at(0.75, LLMTokens, node="a", call_id="a#1", text="Hel")
    j.at(0.8, LLMTokens, node="a", call_id="a#1", text="lo")
    j.at(1.0, LLMCallFinished, node="a", call_id="a#1", model="m", duration_s=0.5)
    j.at(1.0, NodeFinished, node="a", duration_s=1.0)
    j.at(1.0, RunFinished, status="succeeded", duration_s=1.0)
    row = rows_by_id(build_timeline(j.events).rows)["a#1"]
    assert segs(row) == [
        ("queue", approx(0), approx(0.5)),
        ("prefill", approx(0.5), approx(0.75)),
        ("decode", approx(0.75), approx(1.0)),
    ]
    assert row.detail["ttft_s"] == approx(0.25)


def test_failed_run_and_a_resumed_journal() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="g")
    j.at(0, NodeStarted, node="a")
    j.at(1, NodeStarted, node="b")
    # the process dies here; a worker resumes the run from its journal at t=10
    j.at(10, RunStarted, graph="g", resumed=True)
    j.at(10, NodeStarted, node="a")
    j.at(11, NodeFailed, node="a", error="bad input", attempt=1)
    j.at(11, RunFinished, status="failed", error="node 'a' failed: bad input", duration_s=1)
    tl = build_timeline(j.events)
    assert (tl.status, tl.error) == ("failed", "node 'a' failed: bad input")
    assert [m.kind for m in tl.markers] == ["started", "resumed", "finished"]
    rows = rows_by_id(tl.rows)
    assert segs(rows["a"]) == [
        ("failed", approx(0), approx(10)),
        ("failed", approx(10), approx(11)),
    ]
    assert rows["a"].detail["interrupted"] is True
    assert (rows["a"].status, rows["a"].end_s) == ("failed", approx(11))
    assert rows["b"].detail["interrupted"] is True and rows["b"].end_s is None


def test_a_journal_still_running_leaves_rows_open() -> None:
    j = known_run()
    events = j.events[:15]  # at t=2.0: b's tool c1 running, c on its second attempt
    tl = build_timeline(events)
    assert tl.status is None
    rows = rows_by_id(tl.rows)
    assert rows["b"].end_s is None and rows["b"].status == "running"
    assert rows["b:c1"].end_s is None and rows["b:c1"].status == "running"
    assert rows["pin:b#1"].status == "held"
    assert segs(rows["pin:b#1"]) == [("pin", approx(2.0), approx(2.0))]


def test_bad_journals_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="no events"):
        build_timeline([])
    a, b = Journal("r1"), Journal("r2")
    with pytest.raises(ValueError, match="several runs"):
        build_timeline([a.at(0, RunStarted, graph="g"), b.at(0, RunStarted, graph="g")])


async def test_timeline_of_a_real_run_read_back_from_a_store() -> None:
    store = MemoryStore()
    runtime = Runtime(store=store, models={"default": sample_backend()})
    result = await runtime.run(sample_graph(), SAMPLE_INPUTS)
    tl = build_timeline(await store.read_events(result.run_id))
    rows = rows_by_id(tl.rows)
    nodes = {e.node for e in result.events if isinstance(e, NodeStarted | NodeSkipped)}
    assert {r.id for r in tl.rows if r.kind == "node"} == nodes
    assert (rows["fan[1]/d"].parent, rows["fan[1]/d"].depth) == ("fan[1]", 2)
    assert (rows["sub/d"].parent, rows["sub/d"].depth) == ("sub", 1)
    ask_children = [r.kind for r in tl.rows if r.parent == "ask"]
    assert ask_children == ["llm", "tool", "tool", "llm"]
    assert rows["flaky"].attempts == 2
    assert rows["boom"].status == "skipped"
    assert all(r.end_s is not None for r in tl.rows)
    assert tl.status == "succeeded"


# -- rendering and the command -------------------------------------------------------------


def render_text(events: list, width: int = 200) -> str:
    console = Console(file=io.StringIO(), record=True, width=width, color_system=None)
    trace_command(events, as_json=False, console=console)
    return console.export_text()


def test_waterfall_rendering_of_a_known_run() -> None:
    text = render_text(known_run().events)
    lines = text.splitlines()
    assert "run run-1 · known · succeeded · 5.00 s" in lines[0]
    row = {line.split()[1]: line for line in lines[2:14] if len(line.split()) > 1}
    # the bar column: 5 s over the bar width; a runs the first fifth, d the last
    a_bar = row["a"][row["a"].index("█") :].rstrip()
    d_line = row["d"]
    assert a_bar.startswith("█") and set(a_bar.split()[0]) == {"█"}
    assert d_line.index("█") > row["b"].index("█")
    assert "c ×2" in text  # two attempts
    assert "╌" in row["c"]  # the backoff
    assert "░" in text and "▓" in text and "═" in text  # queue, prefill, pin
    assert "1000→100 tok · 600 cached · queue 250.0 ms · ttft 250.0 ms · @r0" in text
    assert "ttl 3.00 s · 1100 tok · used (next_call)" in text
    assert "critical path: a → b → d" in text
    assert "retry backoff" in text  # the legend


def test_bar_positions_follow_time() -> None:
    tl = build_timeline(known_run().events)
    console = Console(file=io.StringIO(), record=True, width=160, color_system=None)
    console.print(render_timeline(tl, width=160))
    lines = console.export_text().splitlines()
    header = lines[1]
    bar_start = header.index("0 ")
    end_label = "5.00 s"
    bar_end = header.index(end_label) + len(end_label)
    width = bar_end - bar_start

    def cells(name: str) -> tuple[int, int]:
        line = next(ln for ln in lines[2:] if ln.split()[1:2] == [name])
        bar = line[bar_start:bar_end]
        filled = [i for i, ch in enumerate(bar) if ch not in " "]
        return filled[0], filled[-1] + 1

    assert cells("a") == (0, round(width / 5))
    assert cells("d") == (round(4 * width / 5), width)


def test_many_map_elements_are_folded() -> None:
    j = Journal()
    j.at(0, RunStarted, graph="wide")
    j.at(0, NodeStarted, node="m")
    for i in range(60):
        j.at(0.01 * i, NodeStarted, node=f"m[{i}]")
        j.at(0.01 * i + 0.5, NodeFinished, node=f"m[{i}]", duration_s=0.5)
    j.at(1.2, NodeFinished, node="m", duration_s=1.2)
    j.at(1.2, RunFinished, status="succeeded", duration_s=1.2)
    text = render_text(j.events)
    assert "m[49]" in text and "m[50]" not in text
    assert "10 more under m" in text
    # the JSON keeps everything
    out = io.StringIO()
    trace_command(j.events, as_json=True, console=Console(file=out))
    assert len(json.loads(out.getvalue())["rows"]) == 61


def test_json_output_is_the_timeline_model() -> None:
    out = io.StringIO()
    trace_command(known_run().events, as_json=True, console=Console(file=out, width=40))
    data = json.loads(out.getvalue())
    assert data["run_id"] == "run-1" and data["status"] == "succeeded"
    rows = {r["id"]: r for r in data["rows"]}
    assert [s["kind"] for s in rows["b#1"]["segments"]] == ["queue", "prefill", "decode"]
    assert rows["d[0]"]["parent"] == "d" and rows["d[0]"]["depth"] == 1
    assert rows["b"]["duration_s"] == approx(3.0)
    assert data["summary"]["critical_path"][-1]["node"] == "d"
    assert data["summary"]["cache_hit_rate"] == approx(1600 / 2200)
    assert data == json.loads(json.dumps(build_timeline(known_run().events).to_dict()))
