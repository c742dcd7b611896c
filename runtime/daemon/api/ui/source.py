"""Where the web view reads runs from: a tenant's runs on the daemon (`DaemonSource`), or
the local SQLite store of `treadle run` (`LocalSource`, for `treadle ui`).

Both give the pages the same things: a page of runs (status filter, id prefix), one run
with its status, its state for the run page (`state.run_state`), its event stream (SSE:
the daemon's live stream; locally, the journal polled), and a way to answer a request for
input (the daemon queues the run for a worker; locally the `treadle ui` process resumes it
itself, as `treadle resume` would).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup
from fastapi import Request
from fastapi.responses import StreamingResponse

from treadle.errors import TreadleError
from treadle.graphs.compile import CompiledGraph
from treadle.graphs.outline import GraphOutline, outline_of
from treadle.runtime.core.events import Event
from treadle.runtime.core.store import TERMINAL, RunRecord, RunStatus
from treadle.runtime.daemon.api.sse import RETRY_MS, sse_message
from treadle.runtime.daemon.api.ui.state import run_state
from treadle.runtime.daemon.registry import SOURCE_PREFIX
from treadle.runtime.daemon.runs import RUN_ID, Conflict, InvalidRequest, NotFound
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.tenants import Tenant
from treadle.runtime.daemon.worker import ProgramError
from treadle.runtime.execution.inputs import (
    InputConflict,
    InputRejected,
    answers_of,
    record_input,
)
from treadle.runtime.execution.runtime import Runtime
from treadle.runtime.stores.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: how often the local view looks for new events in the SQLite journal (s)
LOCAL_POLL_S = 0.25
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class RunRow:
    """One line of the runs list."""

    run_id: str
    workflow: str
    version: str | None
    status: str
    created_at: float
    updated_at: float
    error: str | None


@dataclass(frozen=True)
class RunPage:
    rows: list[RunRow]
    #: where the next page starts (None: this is the last)
    next_cursor: str | None


class RunSource(Protocol):
    #: who is looking (the tenant), for the page's header; None locally
    viewer: str | None

    async def list_runs(
        self, *, status: RunStatus | None, prefix: str | None, cursor: str | None, limit: int
    ) -> RunPage: ...

    async def run(self, run_id: str) -> tuple[RunRecord, str]:
        """The record and the status to show; raises `NotFound`."""
        ...

    async def outline(self, record: RunRecord) -> GraphOutline | None:
        """The run's graph as declared (None when it cannot be found or loaded any more)."""
        ...

    async def state(self, run_id: str) -> dict[str, Any]: ...

    async def answer(
        self, run_id: str, value: Any, node: str | None, key: str | None
    ) -> dict[str, Any]:
        """Record the answer and let the run go on; raises `NotFound`, `InvalidRequest`
        or `InputRejected` (422), `Conflict` or `InputConflict` (409)."""
        ...

    async def events(self, request: Request, run_id: str, after: int) -> StreamingResponse: ...


def _row(record: RunRecord, status: str) -> RunRow:
    return RunRow(
        record.run_id,
        record.graph,
        record.meta.get("workflow_version"),
        status,
        record.created_at,
        record.updated_at,
        record.error,
    )


class DaemonSource:
    """One tenant's runs on the daemon (through `RunService`, which scopes every read)."""

    def __init__(self, services: Services, tenant: Tenant) -> None:
        self.services = services
        self.tenant = tenant
        self.viewer: str | None = tenant.id

    async def list_runs(
        self, *, status: RunStatus | None, prefix: str | None, cursor: str | None, limit: int
    ) -> RunPage:
        page = await self.services.runs.list_runs(
            self.tenant, status=status, limit=limit, cursor=cursor, id_prefix=prefix
        )
        return RunPage([_row(v.record, v.status) for v in page.runs], page.next_cursor)

    async def run(self, run_id: str) -> tuple[RunRecord, str]:
        view = await self.services.runs.get(self.tenant, run_id)
        return view.record, view.status

    async def outline(self, record: RunRecord) -> GraphOutline | None:
        source = record.source or ""
        if not source.startswith(SOURCE_PREFIX):
            return None
        try:  # loaded by the definition checker's process, never on the API's loop
            return await self.services.registry.outline(source[len(SOURCE_PREFIX) :])
        except ProgramError as exc:
            log.info("run %s: no graph to draw: %s", record.run_id, exc)
            return None

    async def state(self, run_id: str) -> dict[str, Any]:
        record, status = await self.run(run_id)
        store = self.services.store
        events = await store.read_events(run_id)  # (the page has the live ones from events)
        outputs = await store.load_outputs(run_id)
        return run_state(record, status, events, outputs, await self.outline(record))

    async def answer(
        self, run_id: str, value: Any, node: str | None, key: str | None
    ) -> dict[str, Any]:
        result, view = await self.services.runs.answer(self.tenant, run_id, value, node=node,
                                                       key=key)  # fmt: skip
        return {
            "run_id": run_id,
            "node": result.node,
            "replayed": result.replayed,
            "status": view.status,
            "pending_inputs": [p.model_dump(mode="json") for p in result.pending],
        }

    async def events(self, request: Request, run_id: str, after: int) -> StreamingResponse:
        # the API's own stream, with its tenant check and its limit on open streams
        from treadle.runtime.daemon.api.auth import limits
        from treadle.runtime.daemon.api.routes_runs import run_events

        return await run_events(run_id, self.tenant, self.services, limits(request),
                                after=after, follow=True, last_event_id=None)  # fmt: skip


class LocalSource:
    """The runs of a local SQLite store (`treadle ui`). Graphs are loaded from the runs'
    recorded sources with `load` (a workflow file, or `file.py:attr`); answers resume the
    run in this process (`tasks`: the server's task group)."""

    def __init__(
        self,
        store: SqliteStore,
        load: Callable[[str], CompiledGraph],
        tasks: TaskGroup,
    ) -> None:
        self.store = store
        self.viewer: str | None = None
        self._load = load
        self._tasks = tasks
        self._graphs: dict[str, CompiledGraph | None] = {}
        self._runtime = Runtime(store=store)

    async def list_runs(
        self, *, status: RunStatus | None, prefix: str | None, cursor: str | None, limit: int
    ) -> RunPage:
        offset = int(cursor) if cursor and cursor.isdigit() else 0
        records = await self.store.list_runs(
            status=status, limit=limit + 1, offset=offset, id_prefix=prefix or None
        )
        more = str(offset + limit) if len(records) > limit else None
        return RunPage([_row(r, r.status) for r in records[:limit]], more)

    async def run(self, run_id: str) -> tuple[RunRecord, str]:
        record = await self.store.get_run(run_id) if RUN_ID.fullmatch(run_id) else None
        if record is None:
            raise NotFound(f"run {run_id!r} not found")
        return record, record.status

    async def outline(self, record: RunRecord) -> GraphOutline | None:
        cg = await self.graph(record)
        return outline_of(cg.spec) if cg is not None else None

    async def graph(self, record: RunRecord) -> CompiledGraph | None:
        """The run's compiled graph, loaded here (the local view runs its own runs)."""
        source = record.source
        if source is None:
            return None
        if source not in self._graphs:
            try:
                self._graphs[source] = await anyio.to_thread.run_sync(self._load, source)
            except (TreadleError, OSError, ValueError) as exc:
                log.info("run %s: cannot load %s: %s", record.run_id, source, exc)
                self._graphs[source] = None
        return self._graphs[source]

    async def state(self, run_id: str) -> dict[str, Any]:
        record, status = await self.run(run_id)
        events = await self.store.read_events(run_id)
        outputs = await self.store.load_outputs(run_id)
        return run_state(record, status, events, outputs, await self.outline(record))

    async def answer(
        self, run_id: str, value: Any, node: str | None, key: str | None
    ) -> dict[str, Any]:
        record, _status = await self.run(run_id)
        cg = await self.graph(record)
        if cg is None:
            raise Conflict(f"run {run_id!r}: its workflow ({record.source}) cannot be loaded")
        try:
            result = await record_input(self.store, answers_of(cg), run_id, value, node=node,
                                        key=key, record=record)  # fmt: skip
        except InputRejected as exc:
            raise InvalidRequest(str(exc)) from None
        except InputConflict as exc:
            raise Conflict(str(exc)) from None
        resumed = not result.replayed and record.status == "waiting"
        if resumed:  # (a run still running elsewhere finds the answer by itself)
            self._tasks.start_soon(self._resume, run_id, cg)
        return {
            "run_id": run_id,
            "node": result.node,
            "replayed": result.replayed,
            "status": "running" if resumed else record.status,
            "pending_inputs": [p.model_dump(mode="json") for p in result.pending],
        }

    async def _resume(self, run_id: str, cg: CompiledGraph) -> None:
        try:
            await self._runtime.resume(run_id, cg, check=False)
        except Exception:  # the run's own failure is recorded; this is the runtime's
            log.exception("resuming run %s failed", run_id)

    async def events(self, request: Request, run_id: str, after: int) -> StreamingResponse:
        await self.run(run_id)  # 404 before the stream starts
        return StreamingResponse(
            self._follow(run_id, after), media_type="text/event-stream", headers=_SSE_HEADERS
        )

    async def _follow(self, run_id: str, after: int) -> AsyncIterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()
        last = after
        while True:
            record = await self.store.get_run(run_id)
            events: list[Event] = await self.store.read_events(run_id, last)
            for event in events:
                yield sse_message(event)
                last = event.seq
            if record is None or record.status in TERMINAL:
                return
            await anyio.sleep(LOCAL_POLL_S)
