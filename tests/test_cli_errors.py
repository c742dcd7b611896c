"""What a user sees when something is wrong: one clear line per problem, no traceback, and
nothing left behind (issue 14). Run as a user runs it: a subprocess of `python -m treadle`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def treadle(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An empty treadle home (its runs.db) for the commands of one test."""
    return {"TREADLE_HOME": str(tmp_path / "home")}


def test_a_bad_model_entry_is_refused_before_the_run_exists(
    tmp_path: Path, home: dict[str, str]
) -> None:
    """14.6: `validate` reports it; `run` says the same in one line and records no run."""
    flow = write(
        tmp_path,
        "flow.yaml",
        """\
        name: m
        models:
          default:
            backend: pool
            replicas: ["http://localhost:8000/v1", "http://localhost:8001/v1"]
        nodes:
          - {id: a, kind: llm, prompt: hi}
        """,
    )
    expected = f"{flow}:5:15: field 'models.default.replicas': replica 0 is "
    checked = treadle("validate", str(flow), env=home)
    assert checked.returncode == 1 and expected in checked.stderr
    ran = treadle("run", str(flow), env=home)
    assert ran.returncode == 2 and expected in ran.stderr
    assert "Traceback" not in ran.stderr
    listed = treadle("runs", env=home)
    assert "running" not in listed.stdout
