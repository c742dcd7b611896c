"""A simulated replica behind `treadle sim serve`'s app, on uvicorn on a free port, for
tests that speak HTTP to it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn

from treadle.backends.scripted import ScriptRule
from treadle.backends.sim.engine import EngineConfig
from treadle.backends.sim.realtime import SimReplica
from treadle.backends.sim.server import build_replicas, create_app


@asynccontextmanager
async def serving(
    *, rules: list[ScriptRule], model: str, config: EngineConfig | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, SimReplica]]:
    replica = build_replicas(1, rules=rules, speed=20.0, model=model, config=config)[0]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(replica), log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            yield client, replica
    finally:
        server.should_exit = True
        await task
        sock.close()
