"""The environment of the daemon's child processes (worker processes, the definition checker).

A child is a fresh interpreter: it imports what its `PYTHONPATH` and installed packages
offer, not what the parent's `sys.path` held. A program that starts a daemon after adding a
folder to `sys.path` (a test's helpers, an application's own functions) expects the
children to import workflows' functions from it as the parent would, so the parent's path
is handed down.
"""

from __future__ import annotations

import os
import sys


def child_env(**extra: str) -> dict[str, str]:
    """The parent's environment, with its `sys.path` folders on `PYTHONPATH`, plus `extra`."""
    folders = [p for p in sys.path if p and os.path.isdir(p)]
    inherited = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join(dict.fromkeys([*folders, *filter(None, inherited.split(os.pathsep))]))
    return {**os.environ, "PYTHONPATH": path, **extra}
