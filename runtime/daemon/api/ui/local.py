"""`treadle ui`: the web view over the local SQLite store that `treadle run` writes, served
on 127.0.0.1 without a login (it shows what the files of this user already hold).

Runs are drawn from the workflow each recorded as its source (a file path, or
`file.py:attr`); a run's page follows its journal as `treadle run` commits it, and a form
answers a waiting run, which this process then resumes (as `treadle resume` would).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request

from treadle.graphs.compile import CompiledGraph
from treadle.runtime.daemon.api.errors import install_error_handlers
from treadle.runtime.daemon.api.ui.routes import ui_router
from treadle.runtime.daemon.api.ui.source import LocalSource, RunSource
from treadle.runtime.stores.sqlite import SqliteStore


async def _source(request: Request) -> RunSource:
    source: RunSource = request.app.state.source
    return source


def create_local_app(db: Path, load: Callable[[str], CompiledGraph]) -> FastAPI:
    """The view of the runs in the SQLite file `db`; `load` compiles a run's source."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = SqliteStore(db)
        try:
            async with anyio.create_task_group() as tasks:
                app.state.source = LocalSource(store, load, tasks)
                yield
                tasks.cancel_scope.cancel()  # a resume in progress stays resumable
        finally:
            await store.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(ui_router(_source, base=""))
    return app
