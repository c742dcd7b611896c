"""Simulated replicas and a gateway on loopback, in the test's event loop, over real HTTP.

`replicas(n)` serves `n` simulator replicas (`treadle.backends.sim.server`), each on its
own free port, optionally wrapped to record the requests they receive;
`gateway_over(urls)` serves `treadle gateway` in front of them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import uvicorn

from treadle.backends.scripted import ScriptRule
from treadle.backends.sim.realtime import SimReplica
from treadle.backends.sim.server import build_replicas, create_app
from treadle.runtime.gateway.config import GatewayConfig, parse_config
from treadle.runtime.gateway.serve import GatewayService, running
from treadle.testing.processes import wait_port

MODEL = "sim-small"


@dataclass
class Recorded:
    """What one replica received: each request's headers and path."""

    headers: list[dict[str, str]] = field(default_factory=list)


def _recording(app: Any, recorded: Recorded) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            recorded.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    return wrapped


@dataclass
class SimServers:
    urls: list[str]
    replicas: list[SimReplica]
    recorded: list[Recorded]
    servers: list[uvicorn.Server]

    def stop(self, i: int) -> None:
        self.servers[i].should_exit = True


@asynccontextmanager
async def replicas(
    n: int = 2, *, rules: list[ScriptRule] | None = None, speed: float = 50.0
) -> AsyncIterator[SimServers]:
    reps = build_replicas(n, rules=rules, speed=speed, model=MODEL)
    recorded = [Recorded() for _ in reps]
    socks, servers = [], []
    for rep, rec in zip(reps, recorded, strict=True):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
        servers.append(
            uvicorn.Server(
                uvicorn.Config(
                    _recording(create_app(rep), rec), log_level="warning", lifespan="off"
                )
            )
        )
    urls = [f"http://127.0.0.1:{s.getsockname()[1]}/v1" for s in socks]
    async with anyio.create_task_group() as tg:
        for server, sock in zip(servers, socks, strict=True):
            tg.start_soon(server.serve, [sock])
        while not all(s.started for s in servers):
            await anyio.sleep(0.01)
        try:
            yield SimServers(urls, reps, recorded, servers)
        finally:
            for s in servers:
                s.should_exit = True
    for sock in socks:
        sock.close()


def config_for(urls: list[str], **extra: Any) -> GatewayConfig:
    model = {"replicas": [{"url": u, "dialect": "sim"} for u in urls]}
    model.update(extra.pop("model_options", {}))
    return parse_config({"models": {MODEL: model}, **extra})


@asynccontextmanager
async def gateway_over(
    urls: list[str], *, tracer_provider: Any = None, **extra: Any
) -> AsyncIterator[tuple[GatewayService, str]]:
    async with running(config_for(urls, **extra), tracer_provider=tracer_provider) as (svc, url):
        yield svc, url


class GatewayProcess:
    """`treadle gateway ARGS` in a process of its own on `port` (to SIGKILL and restart);
    its output goes to `log`."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.args = [
            sys.executable, "-m", "treadle.cli.main", "gateway", "--port", str(port),
            "--log-level", "warning", *args,
        ]  # fmt: skip
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> GatewayProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        # wait in a thread: the replicas this gateway talks to run in this event loop
        await anyio.to_thread.run_sync(wait_port, self.port, "treadle gateway", self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
