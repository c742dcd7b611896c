"""Worker processes of `treadle serve`: by default the API process executes no run itself.

A run executes its tenant's workflow: model calls, tools, functions from allowed modules,
and the CPU work of all of them. In the API's process that work would share one event loop
(and one GIL) with every tenant's requests, so a heavy run of one tenant would slow the
API for all. `WorkerSupervisor` runs the workers as child processes instead (`python -m
treadle.runtime.daemon.cli worker`, given the API's configuration), restarts one that
exits unexpectedly (with backoff), and on shutdown sends SIGTERM — the workers then drain
and hand their runs over — and SIGKILL after `drain_s` more seconds.

The configuration goes to the children in an environment variable (`CONFIG_ENV`), not on
their command line, where `ps` would show the operator's models file's credentials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import anyio
from anyio.abc import Process, TaskStatus

from treadle.runtime.daemon.child_env import child_env
from treadle.runtime.daemon.config import DaemonConfig

log = logging.getLogger(__name__)

#: the environment variable that carries a worker process's `DaemonConfig` (JSON)
CONFIG_ENV = "TREADLE_DAEMON_CONFIG"
#: and the one that names its supervising process: a worker whose parent is another (the
#: supervisor was killed, and could not stop it) stops by itself
PARENT_ENV = "TREADLE_SUPERVISOR_PID"
#: restarts back off from this to `_MAX_BACKOFF_S` while a worker keeps dying young
_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
#: a worker that lived this long before exiting restarts at once
_HEALTHY_S = 60.0


def config_to_env(config: DaemonConfig) -> str:
    """`config` for a worker process: what it needs, as JSON (no `/metrics` token)."""
    data = dataclasses.asdict(config)
    data["metrics_token"] = None
    return json.dumps(data)


def config_from_env(text: str) -> DaemonConfig:
    data: dict[str, Any] = json.loads(text)
    for name in ("allow_imports", "allow_backends"):
        data[name] = tuple(data.get(name) or ())
    return DaemonConfig(**data)


class WorkerSupervisor:
    """`count` worker processes, each running `loops` worker loops (module docstring)."""

    def __init__(
        self, config: DaemonConfig, count: int, *, loops: int = 1, log_level: str = "info"
    ) -> None:
        if count < 1 or loops < 1:
            raise ValueError("count and loops must be >= 1")
        self.config = config
        self.count = count
        self.args = [
            sys.executable, "-m", "treadle.runtime.daemon.cli", "worker", "--config-from-env",
            "--count", str(loops), "--log-level", log_level,
        ]  # fmt: skip
        self.env = child_env(**{CONFIG_ENV: config_to_env(config), PARENT_ENV: str(os.getpid())})
        self.processes: list[Process | None] = [None] * count
        self.restarts = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the workers running until cancelled; then stop them (drain, then kill)."""
        try:
            async with anyio.create_task_group() as tg:
                for slot in range(self.count):
                    await tg.start(self._keep, slot)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all()

    async def _keep(self, slot: int, *, task_status: TaskStatus[None]) -> None:
        backoff = _MIN_BACKOFF_S
        started_once = False
        while True:
            process = await anyio.open_process(
                self.args, env=self.env, stdin=None, stdout=None, stderr=None
            )
            self.processes[slot] = process
            if not started_once:
                started_once = True
                task_status.started()
            born = time.monotonic()
            code = await process.wait()
            self.processes[slot] = None
            lived = time.monotonic() - born
            backoff = _MIN_BACKOFF_S if lived >= _HEALTHY_S else min(backoff * 2, _MAX_BACKOFF_S)
            self.restarts += 1
            log.warning(
                "worker process %d (pid %d) exited with status %s after %.1f s; restarting in "
                "%.1f s",
                slot, process.pid, code, lived, backoff,
            )  # fmt: skip
            await anyio.sleep(backoff)

    async def _stop_all(self) -> None:
        running = [p for p in self.processes if p is not None and p.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(self.config.drain_s + 5.0):
            for process in running:
                await process.wait()
        for process in running:
            if process.returncode is None:
                log.warning("worker process %d did not drain in time: killing it", process.pid)
                process.kill()
                await process.wait()
