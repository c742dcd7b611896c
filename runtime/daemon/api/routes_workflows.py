"""`/v1/workflows`: register, list and read a tenant's workflow definitions and their
versions."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response

from treadle.runtime.daemon.api.auth import ServicesDep, TenantDep
from treadle.runtime.daemon.api.errors import ApiError
from treadle.runtime.daemon.api.responses import JSON_BODY, TENANT, errors
from treadle.runtime.daemon.api.schemas import (
    WorkflowDetail,
    WorkflowIn,
    WorkflowList,
    WorkflowOut,
    WorkflowVersions,
)
from treadle.runtime.daemon.registry import NAME, WorkflowInfo

router = APIRouter(prefix="/v1/workflows", tags=["workflows"])


@router.post(
    "",
    status_code=201,
    response_model=WorkflowOut,
    responses={
        **errors(*JSON_BODY, e422="Invalid request or workflow definition."),
        201: {
            "links": {
                "GetWorkflow": {
                    "operationId": "get_workflow",
                    "parameters": {"name": "$response.body#/name"},
                }
            }
        },
    },
)
async def register_workflow(
    body: WorkflowIn, tenant: TenantDep, services: ServicesDep, response: Response
) -> WorkflowOut:
    """Register a workflow definition under the name it declares: a definition that
    differs from the name's latest becomes its next version (runs already submitted keep
    theirs); the latest one again changes nothing.

    The definition is checked completely: import paths against the daemon's allow-list,
    the file format (errors say `file:line:col`), and the graph (types, cycles, bindings).
    """
    info = await services.registry.register(tenant.id, body.definition, body.format, body.filename)
    response.headers["Location"] = f"/v1/workflows/{info.name}"
    return WorkflowOut.model_validate(info.model_dump())


@router.get("", response_model=WorkflowList, responses=errors(*TENANT))
async def list_workflows(tenant: TenantDep, services: ServicesDep) -> WorkflowList:
    infos = await services.registry.list_workflows(tenant.id)
    return WorkflowList(workflows=[WorkflowOut.model_validate(i.model_dump()) for i in infos])


@router.get("/{name}", response_model=WorkflowDetail, responses=errors(*TENANT, 404))
async def get_workflow(
    tenant: TenantDep, services: ServicesDep, name: str = Path(max_length=100)
) -> WorkflowDetail:
    """The workflow's latest version, with its definition."""
    info = await services.registry.get(tenant.id, name) if NAME.fullmatch(name) else None
    return await _detail(services, name, info)


@router.get("/{name}/versions", response_model=WorkflowVersions, responses=errors(*TENANT, 404))
async def list_versions(
    tenant: TenantDep, services: ServicesDep, name: str = Path(max_length=100)
) -> WorkflowVersions:
    """Every version of the workflow, oldest first."""
    infos = await services.registry.versions(tenant.id, name) if NAME.fullmatch(name) else []
    if not infos:
        raise ApiError(404, f"workflow {name!r} not found")
    return WorkflowVersions(versions=[WorkflowOut.model_validate(i.model_dump()) for i in infos])


@router.get(
    "/{name}/versions/{version}", response_model=WorkflowDetail, responses=errors(*TENANT, 404)
)
async def get_version(
    tenant: TenantDep,
    services: ServicesDep,
    name: str = Path(max_length=100),
    version: int = Path(ge=1, le=1_000_000_000),
) -> WorkflowDetail:
    """One version of the workflow, with its definition."""
    registry = services.registry
    info = await registry.version(tenant.id, name, version) if NAME.fullmatch(name) else None
    return await _detail(services, f"{name} version {version}", info)


async def _detail(services: ServicesDep, what: str, info: WorkflowInfo | None) -> WorkflowDetail:
    if info is None:
        raise ApiError(404, f"workflow {what!r} not found")
    found = await services.registry.definition(info.digest)
    if found is None:  # the definition is written before the name points at it
        raise ApiError(404, f"workflow {what!r} not found")
    return WorkflowDetail(**info.model_dump(), definition=found[1])
