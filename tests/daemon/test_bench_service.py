"""`treadle bench service --quick`, the smoke run, exercises the fault path (14.13): its
faults phase kills a worker and restarts Redis, and nothing accepted is lost; with
`--adversary` a hostile tenant attacks the others (issue 13) and gets nothing it should
not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from treadle.testing.processes import RedisServer, RedisUnavailable


def test_the_quick_run_injects_faults_and_loses_nothing(tmp_path: Path) -> None:
    try:
        RedisServer(tmp_path / "probe")
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    report = tmp_path / "service.json"
    proc = subprocess.run(
        [sys.executable, "-m", "treadle", "bench", "service", "--quick",
         "--duration", "1.5", "--rate", "20", "--adversary", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    faults = data["results"]["faults"]
    assert faults["worker_kills"] >= 1 and faults["redis_restarts"] == 1
    assert data["config"]["kill_every_s"] is not None and data["config"]["restart_redis"]
    for phase in data["results"].values():
        assert phase["accepted"] > 0
        assert phase["runs_lost"] == 0 and phase["cross_tenant_reads_allowed"] == 0
    attacked = data["results"]["adversary"]
    assert attacked["victim_runs_lost"] == 0 and attacked["forbidden_reads_allowed"] == 0
    assert attacked["forbidden_reads_tried"] > 0
    assert attacked["regex_runs"] > 0 and attacked["regex_runs_finished"] == attacked["regex_runs"]
    assert attacked["adversary_refusals"].get("429", 0) > 0  # its burst met its limits
