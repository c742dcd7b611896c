"""`OPTIONS` for every path of the API: 204 with `Allow` naming each method the path has
(FastAPI routes one method each, so Starlette alone answers OPTIONS with 405 and an `Allow`
naming only the first route it tried). A path nothing serves stays 404."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path, and OPTIONS (sorted); empty
    when no route has the path. Each method is tried against the routes as a request of
    that method would be (routers included in the app match as one route)."""
    methods = {
        method
        for method in _METHODS
        if any(
            route.matches({**scope, "method": method})[0] is Match.FULL
            for route in app.router.routes
        )
    }
    return sorted(methods | {"OPTIONS"}) if methods else []


class OptionsMiddleware:
    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            methods = allowed_methods(self.api, scope)
            if methods:
                answer = Response(status_code=204, headers={"Allow": ", ".join(methods)})
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)
