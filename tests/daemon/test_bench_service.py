"""`treadle bench service --quick`, the smoke run, exercises the fault path (14.13): its
faults phase kills a worker and restarts Redis, and nothing accepted is lost."""

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
         "--duration", "1.5", "--rate", "20", "--json", str(report)],
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
