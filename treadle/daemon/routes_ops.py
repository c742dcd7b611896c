"""Operations endpoints, without authentication: `/healthz` and `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from treadle.daemon.auth import ServicesDep
from treadle.daemon.schemas import Health

router = APIRouter(tags=["operations"])


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
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics."}},
)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus text format: HTTP requests, the work queue, and (with an in-process
    worker) runs, nodes, LLM and tool calls."""
    observer = request.app.state.observer
    await observer.refresh(services)
    return Response(observer.metrics.render(), media_type=observer.metrics.content_type)
