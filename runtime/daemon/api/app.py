"""The HTTP API: `create_app(config)` builds the FastAPI application.

Its lifespan opens the process's services (Redis clients, registry, quotas) and the
workers it is asked for: worker *processes* it supervises (`treadle serve`'s default: no
tenant's run executes in the API's process, so none can slow its answers), or worker loops
in this process (`treadle serve --in-process`, and the tests), or none (`treadle serve
--no-worker`: execution is left to `treadle worker` processes on the same Redis).
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
from treadle.runtime.daemon.api.limits import InFlightMiddleware, TenantLimits
from treadle.runtime.daemon.api.metrics import ApiMetrics, HttpMetricsMiddleware
from treadle.runtime.daemon.api.options import OptionsMiddleware
from treadle.runtime.daemon.api.routes_ops import router as ops_router
from treadle.runtime.daemon.api.routes_runs import router as runs_router
from treadle.runtime.daemon.api.routes_workflows import router as workflows_router
from treadle.runtime.daemon.api.ui.daemon_view import mount as mount_ui
from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.supervisor import WorkerSupervisor
from treadle.runtime.daemon.worker import Worker
from treadle.runtime.daemon.worker_process import run_workers

log = logging.getLogger(__name__)

DESCRIPTION = """\
treadle's multi-tenant daemon. Register workflow definitions, submit runs, follow them
as Server-Sent Events, cancel them. Every `/v1` call needs an API key
(`Authorization: Bearer <key>`); a tenant only ever sees its own workflows and runs.
"""


def create_app(
    config: DaemonConfig,
    *,
    workers: int = 0,
    worker_processes: int = 0,
    log_level: str = "info",
) -> FastAPI:
    """The API for `config`, with `worker_processes` supervised worker processes of
    `max(1, workers)` loops each, or else `workers` in-process worker loops (0: none)."""
    api_metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.open(config)
        app.state.services = services
        try:
            async with anyio.create_task_group() as tg:
                if services.registry.checker is not None:
                    tg.start_soon(services.registry.checker.start)
                running: list[Worker] = []
                if worker_processes > 0:
                    supervisor = WorkerSupervisor(
                        config, worker_processes, loops=max(1, workers), log_level=log_level
                    )
                    await tg.start(supervisor.run)
                elif workers > 0:
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
                    if worker_processes > 0:
                        tg.cancel_scope.cancel()  # the supervisor drains its processes
        finally:
            await services.close()

    app = FastAPI(
        title="treadle",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        # operation ids are the handlers' names (submit_run, get_run...): links use them
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,  # served from the package (`install_docs`), not from a CDN
        redoc_url=None,
    )
    app.state.api_metrics = api_metrics
    app.state.config = config
    app.state.limits = limits = TenantLimits(config)
    install_error_handlers(app)
    install_docs(app)
    app.include_router(workflows_router)
    app.include_router(runs_router)
    app.include_router(ops_router)
    mount_ui(app)
    # the last added is outermost: the body's limits refuse before anything else runs
    app.add_middleware(OptionsMiddleware, api=app)
    app.add_middleware(InFlightMiddleware, limits=limits)
    app.add_middleware(HttpMetricsMiddleware, metrics=api_metrics.http)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s
    )
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treadle")
    except PackageNotFoundError:
        return "0"
