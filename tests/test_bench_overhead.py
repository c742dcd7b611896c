"""`treadle bench overhead` produces a well-formed report (numbers are measured, not
asserted: timings belong to benchmarks, not tests)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from treadle.benchmarks.overhead import treadle_graph
from treadle.cli.main import app


def test_shapes_have_the_declared_sizes() -> None:
    assert treadle_graph("chain", 50)[1] == 50
    assert treadle_graph("fanout", 50)[1] == 52
    assert treadle_graph("diamond", 0)[1] == 102
    for shape in ("chain", "fanout", "diamond"):
        graph, count = treadle_graph(shape, 20)
        assert len(graph.compile().nodes) == count


def test_quick_report_structure(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "overhead",
            "--nodes",
            "30",
            "--reps",
            "2",
            "--stores",
            "memory,sqlite",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["bench"] == "overhead"
    systems = set(report["results"])
    assert {"treadle", "treadle-sqlite"} <= systems
    for metrics in report["results"].values():
        assert set(metrics) == {"chain_us_per_node", "fanout_us_per_node", "diamond_us_per_node"}
        assert all(v > 0 for v in metrics.values())
    for system, prefix in (("langgraph", "langgraph"), ("treadle+tracing", "tracing")):
        if system in systems:
            assert {f"{prefix}_over_treadle_{s}" for s in ("chain", "fanout", "diamond")} <= set(
                report["ratios"]
            )
