"""The HTTP API: `create_app(config)` builds the FastAPI application.

Its lifespan opens the process's services (Redis clients, registry, quotas) and, unless
told otherwise, runs in-process workers beside the API (`treadle serve`); `treadle serve
--no-worker` leaves execution to `treadle worker` processes on the same Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from treadle.runtime.daemon.api.body_limit import BodyLimitMiddleware
from treadle.runtime.daemon.api.docs_ui import install_docs
from treadle.runtime.daemon.api.errors import install_error_handlers
from treadle.runtime.daemon.api.metrics import ApiMetrics, HttpMetricsMiddleware
from treadle.runtime.daemon.api.routes_ops import router as ops_router
from treadle.runtime.daemon.api.routes_runs import router as runs_router
from treadle.runtime.daemon.api.routes_workflows import router as workflows_router
from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.worker import Worker
from treadle.runtime.daemon.worker_process import run_workers

log = logging.getLogger(__name__)

DESCRIPTION = """\
treadle's multi-tenant daemon. Register workflow definitions, submit runs, follow them
as Server-Sent Events, cancel them. Every `/v1` call needs an API key
(`Authorization: Bearer <key>`); a tenant only ever sees its own workflows and runs.
"""


def create_app(config: DaemonConfig, *, workers: int = 0) -> FastAPI:
    """The API for `config`, with `workers` in-process workers (0: none)."""
    api_metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.open(config)
        app.state.services = services
        app.state.open_streams = 0
        try:
            async with anyio.create_task_group() as tg:
                running: list[Worker] = []
                if workers > 0:
                    running = await tg.start(
                        lambda **kw: run_workers(
                            services,
                            workers,
                            listeners=[api_metrics.metrics.listener],
                            interceptors=[api_metrics.metrics.calls_in_flight()],
                            **kw,
                        )
                    )
                try:
                    yield
                finally:
                    for worker in running:
                        worker.stop()
        finally:
            await services.close()

    app = FastAPI(
        title="treadle",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from the package (`install_docs`), not from a CDN
        redoc_url=None,
    )
    app.state.api_metrics = api_metrics
    app.state.config = config
    install_error_handlers(app)
    install_docs(app)
    app.include_router(workflows_router)
    app.include_router(runs_router)
    app.include_router(ops_router)
    # outermost first: the size limit refuses before anything else runs
    app.add_middleware(HttpMetricsMiddleware, metrics=api_metrics.http)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treadle")
    except PackageNotFoundError:
        return "0"
