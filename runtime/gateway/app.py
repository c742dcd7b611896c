"""The gateway's HTTP API, OpenAI-compatible:

- `POST /v1/chat/completions` — the hot path (`chat.py`): scheduled, routed, passed
  through. treadle's hints ride in the body's `treadle` field or `X-Treadle-*` headers
  (`treadle.backends.openai_compat.hint_wire`).
- `POST /v1/programs/{id}/end` — a program (run) is over: its place in the scheduler goes.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

The chat path is served by a plain ASGI handler; the other endpoints by FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from treadle.runtime.gateway.chat import Receive, Scope, Send, handle_chat
from treadle.runtime.gateway.context import Gateway

__all__ = ["Gateway", "GatewayApp", "create_app"]

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


class GatewayApp:
    """The ASGI app: chat completions straight to `handle_chat`, the rest to FastAPI."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.api = _api(gateway)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in CHAT_PATHS and scope["method"] == "POST":
            await handle_chat(self.gateway, scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(gateway: Gateway) -> GatewayApp:
    return GatewayApp(gateway)


def _api(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="treadle gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/programs/{program_id}/end")
    async def end_program(program_id: str) -> dict[str, bool]:
        return {"ended": gateway.scheduler.end_program(program_id)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(gateway.started)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "treadle"}
                for name in gateway.pools
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": {
                name: [{"name": r.name, "breaker": r.breaker.state.value} for r in pool.replicas]
                for name, pool in gateway.pools.items()
            },
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
