"""`treadle serve` runs the workers as child processes by default (issue 13: a run must not
share the API's event loop), restarts one that dies, and drains them when it stops."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest
from daemon_support import FIVE, make_config, open_daemon
from redis_support import free_port

from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.supervisor import config_from_env, config_to_env
from treadle.testing.processes import DaemonProcess, wait_port

pytestmark = pytest.mark.anyio


def children(pid: int) -> list[int]:
    """The worker processes among `pid`'s children (the API also has a definition checker)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split() if b"worker" in _cmdline(int(p))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_serve_runs_workers_in_supervised_processes(redis_url: str, tmp_path: Path) -> None:
    async for helper in open_daemon(make_config(redis_url), workers=0):
        key = await helper.tenant("acme")
        await helper.register(key, FIVE)
    port = free_port()
    api = DaemonProcess(
        ["serve", "--redis", redis_url, "--port", str(port), "--lease-ms", "1000",
         "--log-level", "warning"],
        tmp_path / "serve.log",
    ).start()  # fmt: skip
    try:
        assert api.proc is not None
        await anyio.to_thread.run_sync(wait_port, port, "the API", api.proc)
        headers = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}"
        # a loaded machine can be slow to answer; the test's own limits are the fail_afters
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c:

            async def one_run(topic: str) -> dict[str, object]:
                resp = await c.post(
                    "/v1/runs", json={"workflow": "five", "inputs": {"topic": topic}}
                )
                assert resp.status_code == 201, resp.text
                with anyio.fail_after(30):
                    while True:
                        run = (await c.get(f"/v1/runs/{resp.json()['run_id']}")).json()
                        if run["status"] in ("succeeded", "failed", "cancelled"):
                            return dict(run)
                        await anyio.sleep(0.05)

            assert (await one_run("first"))["status"] == "succeeded"
            (worker,) = children(api.proc.pid)
            os.kill(worker, signal.SIGKILL)
            with anyio.fail_after(30):
                while not (found := children(api.proc.pid)) or found == [worker]:
                    await anyio.sleep(0.05)
            assert (await one_run("after the kill"))["status"] == "succeeded"
            replacement = found[0]
        api.stop()  # SIGTERM: the API stops and its worker drains and exits too
        # (uvicorn re-raises the signal once it has shut down)
        assert api.proc.returncode in (0, -signal.SIGTERM)
        assert not Path(f"/proc/{replacement}").exists() or _is_zombie(replacement)
    finally:
        api.kill()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_configuration_reaches_worker_processes_whole() -> None:
    config = DaemonConfig(
        allow_imports=("treadle.examples",), models={"m": {"backend": "sim"}},
        files_root="/srv/files", lease_ms=2000, metrics_token="not for workers",
    )  # fmt: skip
    again = config_from_env(config_to_env(config))
    assert again.metrics_token is None
    assert again == DaemonConfig(**{**config.__dict__, "metrics_token": None})


async def test_worker_processes_stop_when_the_server_is_killed(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    api = DaemonProcess(
        ["serve", "--redis", redis_url, "--port", str(port), "--log-level", "warning"],
        tmp_path / "serve.log",
    ).start()
    try:
        assert api.proc is not None
        await anyio.to_thread.run_sync(wait_port, port, "the API", api.proc)
        with anyio.fail_after(30):
            while not (found := children(api.proc.pid)):
                await anyio.sleep(0.05)
        (worker,) = found
        api.kill()  # SIGKILL: no chance to stop its children
        with anyio.fail_after(30):  # the orphaned worker notices and drains
            while Path(f"/proc/{worker}").exists() and not _is_zombie(worker):
                await anyio.sleep(0.1)
    finally:
        api.kill()
