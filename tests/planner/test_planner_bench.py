"""`treadle bench parallel` on a few queries: the report's shape, the simulation's parts
(virtual time, the latency model), and BFCL calls that validate. No wall-clock asserts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anyio
import pytest

from treadle.backends.sim.profile import Profile
from treadle.benchmarks import parallel
from treadle.benchmarks.parallel import (
    SEARCH_FLOOR_S,
    SEARCH_TAIL_MEAN_S,
    VirtualTimeLoop,
    World,
    choose_args,
    entities,
    load,
)

DATA = parallel.data_dir()


def test_virtual_time_jumps_over_sleeps() -> None:
    async def main() -> tuple[float, float]:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 3600)
            tg.start_soon(anyio.sleep, 7200)
        return start, anyio.current_time()

    start, end = anyio.run(main, backend_options={"loop_factory": VirtualTimeLoop})
    assert end - start == pytest.approx(7200)


def test_the_search_latency_model_matches_the_papers_numbers() -> None:
    world = World(Profile.load(parallel.DEFAULT_PROFILE), seed=1)
    draws = [world.latency("q", i) for i in range(40_000)]
    assert min(draws) >= SEARCH_FLOOR_S
    assert sum(draws) / len(draws) == pytest.approx(0.61, abs=0.01)
    slowest_of_8 = [max(draws[i : i + 8]) for i in range(0, len(draws), 8)]
    assert sum(slowest_of_8) / len(slowest_of_8) == pytest.approx(1.13, abs=0.02)
    harmonic_8 = sum(1 / k for k in range(1, 9))
    assert SEARCH_FLOOR_S + SEARCH_TAIL_MEAN_S * harmonic_8 == pytest.approx(1.13, abs=0.005)


def test_entities_of_comparison_questions() -> None:
    q = "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert entities(q, 2) == ["Scott Derrickson", "Ed Wood"]
    assert len(entities("which one is taller?", 3)) == 3


def test_a_correct_call_takes_the_first_option_its_schema_accepts() -> None:
    params = {
        "type": "dict",
        "properties": {
            "account": {"type": "string"},
            "days": {"type": "integer"},
            "note": {"type": "string"},
        },
        "required": ["account"],
    }
    options = {"account": ["42"], "days": ["7", 7], "note": ["", "x"], "type": ["credit", ""]}
    # "7" is not an integer; "note" may be left out; "type" is not a parameter at all
    assert choose_args(options, params) == {"account": "42", "days": 7}


def test_plans_have_the_shape_each_data_set_needs() -> None:
    (hotpot,) = load("hotpotqa", DATA, 1)
    assert [s.tool for s in hotpot.steps] == ["search", "search"]
    (movie,) = load("movie", DATA, 1)
    assert len(movie.steps) == 8 and movie.levels() == [list(range(8))]
    pqa = load("parallelqa", DATA, 113)
    for w in pqa:
        width = len(w.steps) // 2
        assert [s.tool for s in w.steps] == ["search"] * width + ["math"] * width
        assert [s.deps for s in w.steps[width:]] == [(i + 1,) for i in range(width)]
    assert {len(w.steps) // 2 for w in pqa} == {2, 3, 4, 5}
    plan = pqa[0].plan_text()
    assert plan.splitlines()[-1].endswith("join()<END_OF_PLAN>")


def test_the_benchmark_report(tmp_path: Path) -> None:
    out = tmp_path / "parallel.json"
    parallel.main(
        dataset="hotpotqa,parallelqa,bfcl",
        limit=4,
        quick=True,
        systems="all",
        reps=1,
        overhead_queries=1,
        json_path=out,
    )
    report = json.loads(out.read_text())
    assert report["bench"] == "parallel"
    for dataset in ("hotpotqa", "parallelqa", "bfcl"):
        rows = report["results"][dataset]
        assert set(rows) == {"react", "native", "plan", "stream"}
        for row in rows.values():
            assert row["queries"] == 4
            assert row["latency_mean_s"] > 0
            assert math.isfinite(row["dispatch_overhead_ms_per_task"])
        ratios = report["ratios"][dataset]
        assert {"speedup_vs_react", "stream_vs_plan"} <= set(ratios)
        # ReAct makes one LLM call per tool; the planner two per query (plan, join)
        assert rows["plan"]["llm_calls_per_query"] < rows["react"]["llm_calls_per_query"]
    bfcl = report["results"]["bfcl"]["stream"]
    assert bfcl["calls_total"] > 0
    assert bfcl["calls_valid"] + bfcl["ground_truth_invalid"] == bfcl["calls_total"]
