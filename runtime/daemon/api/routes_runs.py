"""`/v1/runs`: submit runs, read and list them, cancel them, answer their requests for
human input, stream their events; and `/v1/tenant`: the caller's own quotas and usage."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from treadle.runtime.core.store import RunStatus
from treadle.runtime.daemon.api.auth import LimitsDep, ServicesDep, TenantDep
from treadle.runtime.daemon.api.responses import JSON_BODY, TENANT, errors
from treadle.runtime.daemon.api.schemas import (
    InputIn,
    InputOut,
    PendingInput,
    RunIn,
    RunList,
    RunOut,
    TenantOut,
)
from treadle.runtime.daemon.api.sse import event_stream
from treadle.runtime.daemon.runs import RunView

router = APIRouter(prefix="/v1", tags=["runs"])

# W3C trace context, version 00 (later versions may append fields after the flags)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACESTATE_MAX = 512

RunId = Annotated[str, Path(max_length=128, description="A run id from POST /v1/runs.")]


def trace_meta(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """The request's W3C trace context for `RunRecord.meta`. An invalid `traceparent` is
    ignored, as the W3C recommendation requires of a receiver."""
    if not traceparent:
        return {}
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return {}
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return {}
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return {}
    meta = {"traceparent": match.group(0)}
    if tracestate and len(tracestate) <= _TRACESTATE_MAX:
        meta["tracestate"] = tracestate.strip()
    return meta


#: OpenAPI links from a new run to what can be done with it (clients and schemathesis's
#: stateful tests follow them)
_RUN_LINKS = {
    name: {"operationId": operation, "parameters": {"run_id": "$response.body#/run_id"}}
    for name, operation in [
        ("GetRun", "get_run"), ("CancelRun", "cancel_run"), ("RunEvents", "run_events"),
        ("AnswerRun", "answer_run"),
    ]
}  # fmt: skip


@router.post(
    "/runs",
    status_code=201,
    response_model=RunOut,
    responses={**errors(*JSON_BODY, 404), 201: {"links": _RUN_LINKS}},
)
async def submit_run(
    body: RunIn,
    tenant: TenantDep,
    services: ServicesDep,
    response: Response,
    traceparent: Annotated[str | None, Header(max_length=512)] = None,
    tracestate: Annotated[str | None, Header(max_length=_TRACESTATE_MAX)] = None,
) -> RunOut:
    """Start a run of a registered workflow (its latest version, or `version`). It is
    queued (`pending`) and a worker runs it; follow it with GET /v1/runs/{run_id} or its
    event stream."""
    record = await services.runs.submit(
        tenant,
        body.workflow,
        body.inputs,
        trace_meta(traceparent, tracestate),
        version=body.version,
    )
    response.headers["Location"] = f"/v1/runs/{record.run_id}"
    return RunOut.of(RunView(record))


@router.get("/runs", response_model=RunList, responses=errors(*TENANT))
async def list_runs(
    tenant: TenantDep,
    services: ServicesDep,
    status: RunStatus | None = None,
    workflow: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=400, pattern=r"^[A-Za-z0-9_-]*$")] = None,
    id_prefix: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=128,
            pattern=r"^[A-Za-z0-9_-]+$",
            description="Only runs whose id starts with this (one page, newest first).",
        ),
    ] = None,
) -> RunList:
    """The tenant's runs, newest first, optionally filtered; pages go on with `cursor`."""
    page = await services.runs.list_runs(
        tenant, status=status, workflow=workflow, limit=limit, cursor=cursor, id_prefix=id_prefix
    )
    return RunList(runs=[RunOut.of(v, full=False) for v in page.runs], next_cursor=page.next_cursor)


@router.get("/runs/{run_id}", response_model=RunOut, responses=errors(*TENANT, 404))
async def get_run(run_id: RunId, tenant: TenantDep, services: ServicesDep) -> RunOut:
    return RunOut.of(await services.runs.get(tenant, run_id))


@router.post(
    "/runs/{run_id}/cancel",
    status_code=202,
    response_model=RunOut,
    responses=errors(*TENANT, 404, 409),
)
async def cancel_run(run_id: RunId, tenant: TenantDep, services: ServicesDep) -> RunOut:
    """Ask for the run to be cancelled; the worker running it stops it (a queued run is
    marked cancelled when a worker takes it)."""
    return RunOut.of(await services.runs.cancel(tenant, run_id))


@router.post(
    "/runs/{run_id}/input",
    status_code=202,
    response_model=InputOut,
    responses=errors(
        *JSON_BODY,
        404,
        409,
        e409="The run is not waiting for this answer (finished, or the request was answered "
        "with another key).",
        e422="Invalid request, or the answer does not fit the request.",
    ),
)
async def answer_run(
    run_id: RunId, body: InputIn, tenant: TenantDep, services: ServicesDep
) -> InputOut:
    """Answer a waiting run's request for human input (`pending_inputs[].node`; optional
    when it waits on one): the value is checked against the request's `answer_schema`,
    recorded, and the run is queued to go on. Idempotent on `key`: the same answer posted
    again with its key is accepted again (`replayed`) and changes nothing."""
    result, view = await services.runs.answer(
        tenant, run_id, body.value, node=body.node, key=body.key
    )
    return InputOut(
        run_id=run_id,
        node=result.node,
        replayed=result.replayed,
        status=RunOut.of(view).status,
        pending_inputs=[PendingInput(**p.model_dump()) for p in result.pending],
    )


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={
        **errors(*TENANT, 404),
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events."},
    },
)
async def run_events(
    run_id: RunId,
    tenant: TenantDep,
    services: ServicesDep,
    limits: LimitsDep,
    after: Annotated[int, Query(ge=0, description="Send events with seq > after.")] = 0,
    follow: Annotated[bool, Query(description="Keep streaming until the run ends.")] = True,
    last_event_id: Annotated[str | None, Header(max_length=20, pattern=r"^[0-9]*$")] = None,
) -> StreamingResponse:
    """The run's events as Server-Sent Events (`id:` = seq). Resume with the
    `Last-Event-ID` header (EventSource sends it) or `?after=SEQ`."""
    if last_event_id:  # (digits only: the parameter's pattern)
        after = max(after, int(last_event_id))
    await services.runs.get(tenant, run_id)  # 404 before the stream starts
    release = limits.open_stream(tenant.id)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in event_stream(
                services.store, services.stream_redis, run_id, after=after, follow=follow
            ):
                yield chunk
        finally:
            release()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # also when the client left before the body started (the generator never ran)
        background=BackgroundTask(release),
    )


@router.get("/tenant", response_model=TenantOut, tags=["tenant"], responses=errors(*TENANT))
async def get_tenant(tenant: TenantDep, services: ServicesDep) -> TenantOut:
    """The caller's quotas and current usage."""
    return TenantOut(
        tenant=tenant.id,
        max_concurrent_runs=tenant.max_concurrent_runs,
        tokens_per_minute=tenant.tokens_per_minute,
        active_runs=await services.quotas.active_runs(tenant.id),
        tokens_this_minute=await services.quotas.tokens_this_minute(tenant.id),
    )
