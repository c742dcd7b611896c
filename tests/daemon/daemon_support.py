"""Helpers of the daemon tests (fixtures are in conftest.py): a private `redis-server`
(the shared `RedisServer` of `tests/redis_support.py`, so both suites
start Redis the same way), the in-process `Daemon`, a `LiveServer` (uvicorn in a thread),
`WorkerProcess` (a `treadle worker` to SIGKILL) and the test workflows.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from redis_support import free_port

from treadle.runtime.core.events import Event, NodeFinished
from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.api.server import uvicorn_config
from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.worker import Worker
from treadle.runtime.daemon.worker_process import run_workers
from treadle.runtime.stores.redis import RedisStore
from treadle.testing.processes import DaemonProcess

REPO = Path(__file__).resolve().parents[2]

#: five LLM nodes (a diamond and a tail) on the scripted backend: quick and deterministic
FIVE = """\
name: five
description: Outline, expand twice, merge, title.
inputs:
  topic: str
models:
  default: {backend: scripted, latency_s: 0.0}
nodes:
  - {id: outline, kind: llm, prompt: "Outline {topic}", inputs: {topic: $input.topic}}
  - {id: part1, kind: llm, prompt: "Expand part one of {o}", inputs: {o: $outline}}
  - {id: part2, kind: llm, prompt: "Expand part two of {o}", inputs: {o: $outline}}
  - {id: merge, kind: llm, prompt: "Merge {a} and {b}", inputs: {a: $part1, b: $part2}}
  - {id: title, kind: llm, prompt: "Title for {m}", inputs: {m: $merge}}
outputs:
  title: $title
  body: $merge
"""


def slow_workflow(name: str = "slow", latency_s: float = 0.15, steps: int = 8) -> str:
    """A chain of `steps` LLM nodes with a two-way fan-out in the middle: long enough that
    a kill lands mid-run, deterministic so every run's output can be compared."""
    lines = [
        f"name: {name}",
        "inputs:",
        "  topic: str",
        "models:",
        f"  default: {{backend: scripted, latency_s: {latency_s}}}",
        "nodes:",
        '  - {id: s0, kind: llm, prompt: "Step 0 on {t}", inputs: {t: $input.topic}}',
    ]
    prev = "s0"
    for i in range(1, steps):
        if i == steps // 2:
            lines.append(
                f'  - {{id: fa, kind: llm, prompt: "Left of {{x}}", inputs: {{x: ${prev}}}}}'
            )
            lines.append(
                f'  - {{id: fb, kind: llm, prompt: "Right of {{x}}", inputs: {{x: ${prev}}}}}'
            )
            join = (
                f'{{id: s{i}, kind: llm, prompt: "Join {{a}} {{b}}", inputs: {{a: $fa, b: $fb}}}}'
            )
            lines.append(f"  - {join}")
        else:
            lines.append(
                f'  - {{id: s{i}, kind: llm, prompt: "Step {i} on {{x}}", inputs: {{x: ${prev}}}}}'
            )
        prev = f"s{i}"
    lines += ["outputs:", f"  result: ${prev}"]
    return "\n".join(lines) + "\n"


# -- the daemon in-process -------------------------------------------------------------


@dataclass
class Daemon:
    """The app (with `workers` in-process workers) plus helpers, all on the test's loop."""

    config: DaemonConfig
    app: Any
    services: Services
    keys: dict[str, str] = field(default_factory=dict)

    async def tenant(self, name: str, **limits: Any) -> str:
        """Create a tenant; returns its API key."""
        limits.setdefault("max_concurrent_runs", 100)
        await self.services.tenants.create(name, **limits)
        token = (await self.services.tenants.issue_key(name)).token
        self.keys[name] = token
        return token

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://daemon", headers=headers
        )

    async def register(self, key: str, definition: str = FIVE) -> dict[str, Any]:
        async with self.client(key) as c:
            resp = await c.post("/v1/workflows", json={"definition": definition})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def wait_run(self, key: str, run_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        async with self.client(key) as c:
            with anyio.fail_after(timeout_s):
                while True:
                    resp = await c.get(f"/v1/runs/{run_id}")
                    body: dict[str, Any] = resp.json()
                    if body["status"] in ("succeeded", "failed", "cancelled"):
                        return body
                    await anyio.sleep(0.02)


def make_config(redis_url: str, **overrides: Any) -> DaemonConfig:
    """Short leases and drains, so takeovers happen within a test's patience; `/metrics`
    public (test_hardening.py tests its token)."""
    settings: dict[str, Any] = {
        "redis_url": redis_url, "lease_ms": 1000, "drain_s": 2.0, "metrics_public": True,
    }  # fmt: skip
    settings.update(overrides)
    return DaemonConfig(**settings)


async def open_daemon(config: DaemonConfig, workers: int) -> AsyncIterator[Daemon]:
    app = create_app(config, workers=workers)
    async with app.router.lifespan_context(app):
        yield Daemon(config, app, app.state.services)


# -- a live server and worker processes ------------------------------------------------


class LiveServer:
    """`app` served by uvicorn on 127.0.0.1 in a background thread (its own event loop),
    with the daemon's own server settings (`uvicorn_config`)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn_config(app, app.state.config, port=self.port, log_level="warning")
        config.timeout_graceful_shutdown = 2
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class WorkerProcess(DaemonProcess):
    """`python -m treadle.runtime.daemon.cli worker` in a process of its own."""

    def __init__(
        self, redis_url: str, logdir: Path, *, lease_ms: int = 1000, concurrency: int = 16
    ):
        super().__init__(
            [
                "worker", "--redis", redis_url, "--lease-ms", str(lease_ms),
                "--concurrency", str(concurrency), "--drain-s", "2", "--log-level", "warning",
            ],
            logdir / f"worker-{id(self)}.log",
            cwd=REPO,
        )  # fmt: skip


def error_of(resp: httpx.Response) -> tuple[int, str, str]:
    """(status, code, message) of an error response; fails unless the body is our JSON."""
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    return resp.status_code, err["code"], err["message"]


@asynccontextmanager
async def running_workers(services: Services, count: int = 1) -> AsyncIterator[list[Worker]]:
    """In-process workers for the body of the block (stopped, and drained, after it)."""
    async with anyio.create_task_group() as tg:
        workers: list[Worker] = await tg.start(run_workers, services, count)
        try:
            yield workers
        finally:
            for worker in workers:
                worker.stop()


async def journal(store: RedisStore, run_id: str) -> list[Event]:
    return await store.read_events(run_id)


def finished_counts(events: list[Event]) -> Counter[str]:
    """How many times each node instance finished, by the journal."""
    return Counter(e.node for e in events if isinstance(e, NodeFinished))


async def submit(daemon: Daemon, key: str, workflow: str, topic: str) -> str:
    async with daemon.client(key) as c:
        resp = await c.post("/v1/runs", json={"workflow": workflow, "inputs": {"topic": topic}})
    assert resp.status_code == 201, resp.text
    run_id: str = resp.json()["run_id"]
    return run_id


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    with anyio.fail_after(timeout_s):
        while not await predicate():
            await anyio.sleep(0.02)
