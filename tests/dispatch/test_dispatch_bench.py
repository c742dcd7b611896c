"""`treadle bench dispatch`: trace loading, the pooled-cache bound, and a smoke run whose
report structure (not its numbers) is checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from treadle.backends.dispatch.routing import ROUTING_POLICIES
from treadle.backends.sim.profile import Profile
from treadle.benchmarks.dispatch import (
    DEFAULT_TRACE,
    data_dir,
    load_workload,
    main,
    pooled_cache_hits,
    run_bench,
    stamp_resolution_s,
)

RESULT_KEYS = {
    "hit_rate",
    "pooled_hit_rate",
    "hit_rate_vs_pooled",
    "predicted_hit_rate",
    "ttft_p50_s",
    "ttft_p99_s",
    "slo_p99_s",
    "capacity_scale",
    "capacity_rps",
    "runs",
}


def write_mooncake(path: Path, n_conversations: int = 6, turns: int = 4) -> Path:
    """Conversations whose turns extend the previous turn's blocks, on whole-second stamps."""
    lines: list[dict[str, Any]] = []
    next_id = 1000
    for c in range(n_conversations):
        blocks = [0]  # a system prompt every request shares
        for t in range(turns):
            blocks = blocks + list(range(next_id, next_id + 3))
            next_id += 3
            lines.append(
                {
                    "timestamp": (c * 2 + t * 20) * 1000,
                    "input_length": 512 * len(blocks) - 100,
                    "output_length": 50,
                    "hash_ids": blocks,
                }
            )
    lines.sort(key=lambda r: r["timestamp"])
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_loader_dequantizes_whole_second_stamps(tmp_path: Path) -> None:
    trace = write_mooncake(tmp_path / "t.jsonl")
    w0 = load_workload(trace, limit=None, seed=0)
    w1 = load_workload(trace, limit=None, seed=1)
    assert w0.jitter_s == 1.0 and len(w0.rows) == 24
    assert [r.arrival_s for r in w0.rows] == sorted(r.arrival_s for r in w0.rows)
    assert w0.rows[0].arrival_s == 0.0
    assert [r.arrival_s for r in w0.rows] != [r.arrival_s for r in w1.rows]
    assert load_workload(trace, limit=5, seed=0).rows.__len__() == 5
    # a later turn's keys extend the earlier turn's (full blocks only)
    by_len = sorted(zip(w0.rows, w0.chunks, strict=True), key=lambda rc: rc[0].input_length)
    first, later = by_len[0][1], by_len[-1][1]
    assert first[0] == later[0]


def test_loader_reads_azure_csv_as_unique_prompts(tmp_path: Path) -> None:
    csv = tmp_path / "azure.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n"
    )
    w = load_workload(csv, limit=None, seed=0)
    assert w.jitter_s == 0.0
    assert [round(r.arrival_s, 3) for r in w.rows] == [0.0, 4.315, 4.542]
    assert len(set(w.chunks[0]) & set(w.chunks[1])) == 0  # nothing shared
    with pytest.raises(FileNotFoundError, match="TREADLE_DATA"):
        load_workload(tmp_path / "missing.jsonl", limit=None, seed=0)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_workload(tmp_path / "x.txt", limit=None, seed=0)


def test_stamp_resolution() -> None:
    from treadle.backends.sim.trace import TraceRow

    assert stamp_resolution_s([TraceRow(float(s), 10, 1) for s in range(10)]) == 1.0
    assert stamp_resolution_s([TraceRow(s * 0.37, 10, 1) for s in range(10)]) == 0.0


def test_pooled_cache_hits_follow_lru(tmp_path: Path) -> None:
    w = load_workload(write_mooncake(tmp_path / "t.jsonl"), limit=None, seed=0)
    big = pooled_cache_hits(w, 1 << 30, 16)
    assert big[0] == 0 and sum(big) > 0
    # later turns reuse their conversation's earlier turns: at least the full blocks
    # of the previous turn (3 blocks more each turn)
    assert max(big) >= 512 * 7
    tiny = pooled_cache_hits(w, 64, 16)  # 1,024 tokens: only the shared first block fits
    assert sum(tiny) < sum(big)


def test_run_bench_on_a_small_trace(tmp_path: Path) -> None:
    config, results, ratios = run_bench(
        trace=write_mooncake(tmp_path / "t.jsonl"),
        replicas=2,
        slo_s=2.0,
        slo_mode="absolute",
        profile_name="h100_sxm_llama31_8b",
        requests=None,
        seed=0,
        ref_scale=1.0,
        tolerance=0.5,
        echo=lambda _: None,
    )
    assert config["slo_mode"] == "absolute" and config["replicas"] == 2
    assert set(results) == set(ROUTING_POLICIES)
    for r in results.values():
        assert set(r) >= RESULT_KEYS
        assert 0.0 <= r["hit_rate"] <= 1.0 and r["capacity_scale"] >= 0.0
    assert set(ratios) == {
        "capacity_vs_round_robin",
        "capacity_vs_cache_aware",
        "capacity_vs_least_load",
    }
    with pytest.raises(ValueError, match="unknown policies"):
        run_bench(
            trace=tmp_path / "t.jsonl",
            replicas=2,
            slo_s=2.0,
            slo_mode="absolute",
            profile_name="h100_sxm_llama31_8b",
            requests=None,
            seed=0,
            ref_scale=1.0,
            tolerance=0.5,
            policies=["random"],
        )


def test_requests_longer_than_the_context_are_refused_and_counted(tmp_path: Path) -> None:
    """14.12: a real server answers a request over its context with 400; the benchmark
    counts those per policy and replays the rest, instead of aborting."""
    trace = write_mooncake(tmp_path / "t.jsonl")
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    for i in (3, 10):  # two requests over Llama-3.1's 131,072-token context
        n_blocks = 131072 // 512 + 2
        rows[i]["hash_ids"] = list(range(90000 + 1000 * i, 90000 + 1000 * i + n_blocks))
        rows[i]["input_length"] = 512 * n_blocks - 10
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines: list[str] = []
    config, results, _ = run_bench(
        trace=trace,
        replicas=2,
        slo_s=2.0,
        slo_mode="absolute",
        profile_name="h100_sxm_llama31_8b",
        requests=None,
        seed=0,
        ref_scale=1.0,
        tolerance=0.5,
        echo=lines.append,
    )
    assert config["requests"] == len(rows) and config["refused_requests"] == 2
    assert config["max_model_len"] == 131072
    for r in results.values():
        assert r["refused"] == 2 and r["capacity_scale"] > 0
    assert any("2 requests are longer than the model's context" in line for line in lines)


def test_quick_smoke_run_writes_the_report(tmp_path: Path) -> None:
    trace = data_dir() / DEFAULT_TRACE
    if not trace.is_file():
        pytest.skip(f"the Mooncake trace is not at {trace}")
    app = typer.Typer()
    app.command()(main)
    out = tmp_path / "dispatch.json"
    result = CliRunner().invoke(app, ["--quick", "--requests", "600", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["bench"] == "dispatch"
    config = report["config"]
    for key in ("profile", "replicas", "seed", "slo_s", "slo_mode", "requests", "quick"):
        assert key in config
    assert config["profile"] == Profile.default().name and config["replicas"] == 8
    assert config["requests"] == 600 and config["quick"] is True
    assert set(report["results"]) == set(ROUTING_POLICIES)
    for row in report["results"].values():
        assert set(row) >= RESULT_KEYS
    assert {"capacity_vs_round_robin", "capacity_vs_cache_aware"} <= set(report["ratios"])
    assert "capacity" in result.output and "treadle" in result.output
