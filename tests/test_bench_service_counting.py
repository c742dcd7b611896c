"""`treadle bench service` counts honestly (issue 13): a run still queued when the drain
times out is unfinished, not lost; lost is what the drained queue will never finish; a
side effect repeated after a kill is a re-execution, and one repeated with another key is
caught."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from treadle.benchmarks.service import _sink_stats, _summarize
from treadle.benchmarks.service_load import Phase


def test_a_repeated_call_with_the_same_key_is_a_reexecution(tmp_path: Path) -> None:
    sink = tmp_path / "sink.txt"
    sink.write_text(
        "r1:merge:1\tabc\n"  # run r1's merge ...
        "r1:merge:1\tabc\n"  # ... executed again after a kill: same inputs, same key
        "r2:merge:1\tdef\n"
        "other:merge:1\tzzz\n"  # another phase's run: not counted
    )
    stats = _sink_stats(sink, {"r1", "r2"})
    assert stats == {
        "tool_calls": 3,
        "tool_reexecutions": 1,
        "idempotency_keys_per_call": 1,
        "tool_calls_without_key": 0,
    }
    with sink.open("a") as out:
        out.write("r2:merge:2\tdef\n")  # the same call under another key: caught
    assert _sink_stats(sink, {"r1", "r2"})["idempotency_keys_per_call"] == 2


def _record(status: str) -> SimpleNamespace:
    return SimpleNamespace(status=status, updated_at=10.0)


def test_lost_only_once_the_queue_has_drained() -> None:
    phase = Phase("faults", 10.0, 1.0, started=0.0, ended=1.0)
    records = {"a": _record("succeeded"), "b": _record("pending"), "c": None}
    drained = _summarize(phase, records, 0, {})
    assert (drained["runs_lost"], drained["runs_unfinished"]) == (2, 0)
    backlog = _summarize(phase, records, 5, {})
    assert (backlog["runs_lost"], backlog["runs_unfinished"], backlog["queue_left"]) == (0, 2, 5)
