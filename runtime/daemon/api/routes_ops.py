"""Operations endpoints: `/healthz` (public, for load balancers and probes) and `/metrics`.

`/metrics` tells run counts, tenants and workflow names, so it needs the operator's bearer
token (`treadle serve --metrics-token`, or `TREADLE_METRICS_TOKEN`) unless the operator
serves it on a private network with `--metrics-public`. Without either it answers 401: a
scraper that is not configured fails loudly instead of the data being open by default.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from treadle.runtime.daemon.api.auth import ServicesDep
from treadle.runtime.daemon.api.errors import ApiError
from treadle.runtime.daemon.api.schemas import Health
from treadle.runtime.daemon.config import DaemonConfig

router = APIRouter(tags=["operations"])

_metrics_bearer = HTTPBearer(
    auto_error=False, scheme_name="MetricsToken", description="`treadle serve --metrics-token`."
)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="treadle-metrics"'}


async def metrics_access(  # a coroutine: FastAPI would run a plain def in a thread
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_metrics_bearer)],
) -> None:
    """Let the request through when `/metrics` is public or it carries the metrics token."""
    config: DaemonConfig = request.app.state.config
    if config.metrics_public:
        return
    if config.metrics_token is None:
        raise ApiError(
            401,
            "/metrics needs a token and none is configured: start the daemon with "
            "--metrics-token (or TREADLE_METRICS_TOKEN), or --metrics-public on a private "
            "network",
            headers=_CHALLENGE,
        )
    if bearer is None or not bearer.credentials:
        raise ApiError(
            401, "/metrics needs the metrics token (Authorization: Bearer <token>)",
            headers=_CHALLENGE,
        )  # fmt: skip
    given = bearer.credentials.strip().encode("utf-8", "surrogatepass")
    # constant time: the comparison must not tell how much of a guess was right
    if not hmac.compare_digest(given, config.metrics_token.encode("utf-8", "surrogatepass")):
        raise ApiError(401, "the metrics token is not valid", headers=_CHALLENGE)


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(services: ServicesDep) -> Any:
    """200 when the API can reach Redis, else 503 (for load balancers and probes)."""
    try:
        await services.redis.ping()
    except (RedisError, OSError) as exc:
        return JSONResponse(
            Health(status="unavailable", redis=f"error: {exc}").model_dump(), status_code=503
        )
    return Health(status="ok", redis="ok")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus metrics."},
        401: {"description": "No metrics token, or not the configured one."},
    },
    dependencies=[Depends(metrics_access)],
)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus text format: HTTP requests, the work queue, and (with an in-process
    worker) runs, nodes, LLM and tool calls. Needs the metrics token unless the daemon
    serves it publicly (`--metrics-public`)."""
    api_metrics = request.app.state.api_metrics
    await api_metrics.refresh(services)
    return Response(api_metrics.metrics.render(), media_type=api_metrics.metrics.content_type)
