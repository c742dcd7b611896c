"""The GitHub Copilot agent-trace format: the generator matches the release's published
aggregates, the reader turns sessions into programs by the documented rules (context
growth, compaction, tool gaps, human waits), refuses malformed lines naming file, line
and field, and `treadle bench agents --trace` replays a generated trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treadle.benchmarks.agents.bench import main
from treadle.benchmarks.agents.copilot import (
    generate_sessions,
    read_sessions,
    session_program,
    summarize,
    trace_workload,
    write_sessions,
)
from treadle.benchmarks.agents.workloads import Keys


def test_generated_sessions_match_the_published_aggregates() -> None:
    stats = summarize(generate_sessions(1500, seed=4))
    assert stats["turns_per_session"] == pytest.approx(3.95, rel=0.08)
    assert stats["llm_calls_per_turn"] == pytest.approx(7.83, rel=0.06)
    assert stats["tool_calls_per_batch"] == pytest.approx(1.12, rel=0.03)
    assert stats["mean_prompt_tokens"] == pytest.approx(68_000, rel=0.06)
    assert stats["cached_fraction"] == pytest.approx(0.86, abs=0.03)
    assert stats["mean_completion_tokens"] == pytest.approx(530, rel=0.06)
    assert generate_sessions(3, seed=1) == generate_sessions(3, seed=1)
    assert generate_sessions(3, seed=1) != generate_sessions(3, seed=2)


@pytest.mark.parametrize("name", ["trace.jsonl", "trace.jsonl.gz"])
def test_a_written_trace_reads_back(tmp_path: Path, name: str) -> None:
    sessions = generate_sessions(20, seed=0)
    path = tmp_path / name
    assert write_sessions(path, sessions) == 20
    assert read_sessions(path) == sessions


def _call(mid: str, ts: str, prompt: int, completion: int, ms: float = 1000.0) -> dict:
    return {
        "message_id": mid,
        "timestamp": ts,
        "duration_ms": ms,
        "tokens": {"prompt": prompt, "completion": completion, "cached": 0},
    }


def test_sessions_become_conversations_with_tool_gaps_compactions_and_human_waits() -> None:
    session = {
        "session_id": "s",
        "turns": [
            {
                "turn_id": "t0",
                "llm_calls": [
                    _call("a", "2026-06-01T10:00:00+00:00", 10_000, 100),
                    _call("b", "2026-06-01T10:00:04+00:00", 10_600, 50),
                ],
                "tool_batches": [
                    {
                        "timestamp": "2026-06-01T10:00:01+00:00",
                        "duration_ms": 2500.0,
                        "request_id": "a",
                        "function_calls": [{"name": "run_in_terminal", "duration_ms": 2500.0}],
                    }
                ],
            },
            {
                "turn_id": "t1",
                "llm_calls": [
                    # the person answered 60 s after the turn ended; the prompt shrank
                    _call("c", "2026-06-01T10:01:05+00:00", 4_000, 80),
                ],
            },
        ],
    }
    prog = session_program(session, 7, 1.5, Keys())
    a, b, c = prog.calls
    # a -> b: the context grew by 10,600 - (10,000 + 100) tokens after a 3 s tool gap
    assert (a.base, a.prompt_tokens, a.tool) == (None, 10_000, "run_in_terminal")
    assert a.tool_s == pytest.approx(3.0) and a.human_wait_s == 0.0 and a.continues
    assert b.base == 0 and sum(n for _, n in b.append) == 500
    # b -> c: a human wait of 60 s (the turn's end to the next turn's start), no tool
    assert b.tool is None and b.human_wait_s == pytest.approx(60.0)
    # c: a compaction: a fresh prompt of new content
    assert c.base is None and c.append[0][1] == 4_000 and not c.continues
    assert (prog.pid, prog.arrival_unit, prog.kind) == (7, 1.5, "copilot")


def test_malformed_lines_name_the_file_line_and_field(tmp_path: Path) -> None:
    good = json.dumps(generate_sessions(1, seed=0)[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + '{"turns": [{"llm_calls": [{"tokens": {"prompt": -1}}]}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: turns\[0\]\.llm_calls\[0\]"):
        read_sessions(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not JSON"):
        read_sessions(broken)
    with pytest.raises(ValueError, match="no such trace file"):
        read_sessions(tmp_path / "missing.jsonl")


def test_a_short_trace_is_replayed_with_fresh_content(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_sessions(path, generate_sessions(3, seed=0))
    w = trace_workload(path, 7, seed=1)
    assert len(w.programs) == 7
    keys = [k for p in w.programs for c in p.calls for k, _ in c.append]
    assert len(keys) == len(set(keys))  # replays share nothing
    assert w.params["sessions_in_trace"] == 3


def test_bench_replays_a_generated_trace(tmp_path: Path) -> None:
    import typer

    app = typer.Typer()
    app.command()(main)
    path = tmp_path / "gen.jsonl"
    made = CliRunner().invoke(app, ["--generate-trace", str(path), "--sessions", "12"])
    assert made.exit_code == 0, made.output
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "--trace",
            str(path),
            "--programs",
            "6",
            "--systems",
            "vllm,treadle",
            "--seeds",
            "1",
            "--workers",
            "1",
            "--grid-step",
            "2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["config"]["trace"] == str(path) and data["results"]["treadle"]["capacity_per_min"]
