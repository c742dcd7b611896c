"""`treadle bench agents` on small inputs: the workloads match their stated statistics,
every system runs every program to completion on the simulated cluster, no program beats
its physical limit, and the report has the documented shape."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treadle.backends.sim import Profile
from treadle.benchmarks.agents.bench import ClusterSpec, main, micro_benchmark, run_bench, run_point
from treadle.benchmarks.agents.sim import ideal_times
from treadle.benchmarks.agents.systems import SYSTEMS
from treadle.benchmarks.agents.workloads import make_workload


def test_workloads_are_seeded_and_match_their_statistics() -> None:
    a, b, c = make_workload("swe", 60, 1), make_workload("swe", 60, 1), make_workload("swe", 60, 2)
    assert [p.calls for p in a.programs] == [p.calls for p in b.programs]
    assert [p.calls for p in a.programs] != [p.calls for p in c.programs]
    swe = make_workload("swe", 400, 0)
    turns = statistics.fmean(len(p.calls) for p in swe.programs)
    assert 30 <= turns <= 45
    tools = [c.tool for p in swe.programs for c in p.calls if c.tool]
    fast = sum(t in ("view_file", "search", "edit_file") for t in tools) / len(tools)
    assert 0.65 <= fast <= 0.8
    bfcl = make_workload("bfcl", 400, 0)
    calls = [c for p in bfcl.programs for c in p.calls]
    assert 9.5 <= len(calls) / 400 <= 12
    assert 650 <= statistics.fmean(c.prompt_tokens for c in calls) <= 820
    assert 30 <= statistics.fmean(c.output_tokens for c in calls) <= 38
    mixed = make_workload("mixed", 300, 0)
    assert (
        {p.tenant for p in mixed.programs} == set(mixed.tenants) == {"coders", "callers", "teams"}
    )
    ma = make_workload("multiagent", 10, 0)
    last = [c for c in ma.programs[0].calls if c.is_last_step]
    assert len(last) == 1 and last[0].agent == "writer"
    with pytest.raises(ValueError):
        make_workload("nope", 10)


@pytest.mark.parametrize("workload", ["swe", "multiagent"])
def test_every_system_finishes_every_program_above_its_ideal(workload: str) -> None:
    w = make_workload(workload, 10, 3)
    profile = Profile.default()
    ideal = ideal_times(w, profile)
    rate = 0.05 if workload == "swe" else 2.0
    cluster = ClusterSpec(replicas=2, profile=profile.name)
    hit: dict[str, float] = {}
    for system in SYSTEMS:
        res = run_point(w, system, rate, cluster)
        assert len(res.jct) == 10
        # nothing runs faster than alone on an empty replica with a perfect cache
        assert min(res.jct[p] / ideal[p] for p in res.jct) >= 0.999
        m = res.metrics(ideal)
        assert 0.0 <= m["hit_rate"] <= 1.0 and m["jct_p99_s"] >= m["jct_p50_s"]
        hit[system] = m["hit_rate"]
        if system in ("vllm", "autellix"):
            assert res.pins["set"] == 0
    if workload == "swe":
        # affinity and pins keep conversations' prefixes; least-load routing does not
        assert hit["treadle"] >= hit["vllm"]
        assert hit["continuum"] >= hit["vllm"]


def test_report_shape_and_cli(tmp_path: Path) -> None:
    report = run_bench(
        workload_name="swe",
        loads=[0.9],
        cluster=ClusterSpec(replicas=2, profile="h100_sxm_llama31_8b"),
        seed=0,
        programs=8,
        systems=list(SYSTEMS),
        saturation_programs=8,
        slo_factor=2.0,
        workers=1,
        saturation_per_min=2.0,
        log=lambda _: None,
    )
    for system in SYSTEMS:
        metrics = report["results"][system]["0.9"]
        for key in (
            "jct_mean_s",
            "jct_p50_s",
            "jct_p99_s",
            "throughput_per_min",
            "hit_rate",
            "recomputed_tokens",
            "jain",
            "jct_over_ideal_mean",
        ):
            assert isinstance(metrics[key], float)
    assert set(report["ratios"]["0.9"]) >= {
        "jct_mean_vs_vllm",
        "jct_p99_vs_vllm",
        "jct_mean_vs_continuum",
        "throughput_vs_vllm",
    }
    out = tmp_path / "agents.json"
    result = CliRunner().invoke(
        _app(),
        [
            "--programs",
            "6",
            "--replicas",
            "2",
            "--load",
            "0.8",
            "--saturation",
            "2",
            "--systems",
            "vllm,treadle",
            "--workers",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["bench"] == "agents" and set(data["results"]) == {"vllm", "treadle"}
    assert data["config"]["seed"] == 0 and data["config"]["workload_params"]["programs"] == 6
    bad = CliRunner().invoke(_app(), ["--workload", "nope"])
    assert bad.exit_code != 0


def _app():  # type: ignore[no-untyped-def]
    import typer

    app = typer.Typer()
    app.command()(main)
    return app


def test_micro_benchmark_runs_at_a_steady_queue() -> None:
    m = micro_benchmark(queued=2_000, decisions=300)
    assert m["queued_calls"] >= 1_900 and m["us_per_decision"] > 0
