"""Running the command line as a user does: `python -m treadle` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def treadle(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The command with a wide terminal (its tables are not squeezed), `env` added."""
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def piped(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command with its output piped and no terminal width given (as CI runs it):
    Rich falls back to 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
