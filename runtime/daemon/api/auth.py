"""Who is calling: the `tenant` dependency of every `/v1` route.

The API key comes as `Authorization: Bearer <key>` or `X-API-Key: <key>`. A missing,
malformed, unknown or revoked key — or a revoked tenant — gets the same 401, so the
answer tells an attacker nothing about which part was wrong. A known tenant's request then
passes its limits (`TenantLimits`: rate, requests in progress), which hold for the whole
request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from treadle.runtime.daemon.api.errors import ApiError
from treadle.runtime.daemon.api.limits import TenantLimits
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.tenants import Tenant, key_id_of

_bearer = HTTPBearer(auto_error=False, description="An API key: `treadle tenants create`.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same API key.")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="treadle"'}


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def limits(request: Request) -> TenantLimits:
    found: TenantLimits = request.app.state.limits
    return found


async def tenant(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_header)],
) -> Tenant:
    token = bearer.credentials if bearer is not None else api_key
    if not token:
        raise ApiError(401, "an API key is required (Authorization: Bearer <key>)",
                       headers=_CHALLENGE)  # fmt: skip
    token = token.strip()
    tenant_limits = limits(request)
    key_id = key_id_of(token)
    if key_id is not None:
        tenant_limits.precheck(key_id)
    found = await services(request).tenants.authenticate(token)
    if found is None:
        raise ApiError(401, "the API key is not valid", headers=_CHALLENGE)
    tenant_limits.admit(found.id, key_id)
    tenant_limits.enter(found.id, request.scope)
    return found


# FastAPI runs a plain `def` dependency in a worker thread: two thread hand-offs a request
# for reading an attribute. These are coroutines, so they run on the loop.
async def _services_dependency(request: Request) -> Services:
    return services(request)


async def _limits_dependency(request: Request) -> TenantLimits:
    return limits(request)


ServicesDep = Annotated[Services, Depends(_services_dependency)]
LimitsDep = Annotated[TenantLimits, Depends(_limits_dependency)]
TenantDep = Annotated[Tenant, Depends(tenant)]
