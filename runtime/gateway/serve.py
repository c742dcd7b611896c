"""Building and running a gateway: `build_gateway(config)` makes the pools, the scheduler
and the HTTP client; `GatewayService` adds what runs beside requests (Redis state, the
closing of idle programs); `serve` runs it under uvicorn, with uvloop and httptools when
they are installed (the fastest event loop and HTTP parser uvicorn has).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import socket
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio
import uvicorn

from treadle.runtime.gateway.app import Gateway, GatewayApp, create_app
from treadle.runtime.gateway.config import GatewayConfig
from treadle.runtime.gateway.scheduling import GatewayScheduler
from treadle.runtime.gateway.state import GatewayState
from treadle.runtime.gateway.tracing import GatewayTracing
from treadle.runtime.gateway.upstream import ModelPool, make_client

_log = logging.getLogger(__name__)


def build_gateway(config: GatewayConfig, *, tracer_provider: Any = None) -> Gateway:
    pools = {name: ModelPool(name, mc) for name, mc in config.models.items()}
    scheduler = GatewayScheduler(
        [(name, mc.max_in_flight) for name, mc in config.models.items()],
        tenant_weights=dict(config.tenants),
        program_idle_s=config.program_idle_s,
    )
    return Gateway(pools, scheduler, make_client(config), tracing=GatewayTracing(tracer_provider))


class GatewayService:
    """A gateway with its background work: `async with GatewayService(config) as svc:`
    loads the Redis state (if configured) and keeps saving it, closes idle programs, and
    closes the HTTP client at the end. `svc.app` is the ASGI app."""

    def __init__(
        self, config: GatewayConfig, *, tracer_provider: Any = None, save_interval_s: float = 0.1
    ) -> None:
        self.config = config
        self.gateway = build_gateway(config, tracer_provider=tracer_provider)
        self.app: GatewayApp = create_app(self.gateway)
        self.state: GatewayState | None = None
        self.save_interval_s = save_interval_s
        self._tg: anyio.abc.TaskGroup | None = None
        self._redis: Any = None

    async def __aenter__(self) -> GatewayService:
        if self.config.redis_url is not None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(self.config.redis_url)
            self.state = GatewayState(
                self._redis, self.gateway.scheduler, prefix=self.config.redis_prefix
            )
            tenants, programs = await self.state.load()
            _log.info("gateway state: %d tenants, %d programs restored", tenants, programs)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.state is not None:
            self._tg.start_soon(self.state.run, self.save_interval_s)
        self._tg.start_soon(self._expire_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(exc_type, exc, tb)
        if self.state is not None:
            with contextlib.suppress(Exception):  # a last save; Redis may be gone too
                await self.state.save()
        if self._redis is not None:
            await self._redis.aclose()
        await self.gateway.client.aclose()

    async def _expire_loop(self) -> None:
        every = min(10.0, self.config.program_idle_s / 4)
        while True:
            await anyio.sleep(every)
            self.gateway.scheduler.expire_idle()


def uvicorn_options() -> dict[str, Any]:
    """uvloop and httptools when installed; else asyncio and h11."""
    options: dict[str, Any] = {}
    if importlib.util.find_spec("uvloop") is not None:
        options["loop"] = "uvloop"
    if importlib.util.find_spec("httptools") is not None:
        options["http"] = "httptools"
    return options


@contextlib.asynccontextmanager
async def running(
    config: GatewayConfig,
    sock: socket.socket | None = None,
    *,
    tracer_provider: Any = None,
    log_level: str = "warning",
) -> AsyncIterator[tuple[GatewayService, str]]:
    """A gateway serving on `sock` (a free loopback port when None) in this event loop,
    for tests and benchmarks; yields the service and its base URL (`.../v1`)."""
    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with GatewayService(config, tracer_provider=tracer_provider) as service:
        server = uvicorn.Server(
            uvicorn.Config(service.app, log_level=log_level, lifespan="off", access_log=False)
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                await anyio.sleep(0.01)
            try:
                yield service, f"http://127.0.0.1:{port}/v1"
            finally:
                server.should_exit = True
    sock.close()


async def serve(
    config: GatewayConfig, host: str = "127.0.0.1", port: int = 9000, log_level: str = "info"
) -> None:
    """Serve until SIGINT/SIGTERM."""
    async with GatewayService(config) as service:
        server = uvicorn.Server(
            uvicorn.Config(
                service.app,
                host=host,
                port=port,
                log_level=log_level,
                lifespan="off",
                access_log=False,
                backlog=4096,
                # clients' pools keep connections (httpx: 5 s); longer here, so a client
                # does not reuse one the gateway is closing
                timeout_keep_alive=30,
                **uvicorn_options(),
            )
        )
        await server.serve()
