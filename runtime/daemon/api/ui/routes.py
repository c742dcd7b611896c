"""The web view's routes, the same for the daemon (`/ui`, each request's source is the
logged-in tenant's) and for `treadle ui` (at `/`, the local store):

- `GET {base}/`: the runs list (`?status=`, `?q=` an id or id prefix, `?cursor=`);
- `GET {base}/runs/{run_id}`: a run's page;
- `GET {base}/api/runs/{run_id}/state`: the page's JSON (`state.run_state`);
- `GET {base}/api/runs/{run_id}/events`: the run's events (SSE, resumable);
- `POST {base}/api/runs/{run_id}/input`: answer a request for input (JSON only, which
  a form on another site cannot send: no cross-site request forgery);
- `GET {base}/static/{name}`: the page's script and style, shipped in the package.

`get_source(request)` gives the request's `RunSource`, or raises `LoginRequired`: pages
then redirect to the login page, the JSON routes answer 401.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from treadle.errors import DaemonError
from treadle.runtime.daemon.api.ui.dag import to_svg
from treadle.runtime.daemon.api.ui.pages import CSP, STATUSES, not_found_page, run_page, runs_page
from treadle.runtime.daemon.api.ui.source import RunPage, RunSource
from treadle.runtime.daemon.runs import RUN_ID, InvalidRequest, NotFound

PAGE_SIZE = 50
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
_SECURITY = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginRequired(DaemonError):
    """The request has no valid session (the daemon's view)."""


SourceGetter = Callable[[Request], Awaitable[RunSource]]


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=_SECURITY)


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("treadle.runtime.daemon.api.ui") / "static"
    found: dict[str, tuple[bytes, str]] = {}
    for item in folder.iterdir():
        kind = _STATIC_TYPES.get("." + item.name.rsplit(".", 1)[-1])
        if kind is not None:
            found[item.name] = (item.read_bytes(), kind)
    return found


def ui_router(get_source: SourceGetter, *, base: str) -> APIRouter:
    """The view's routes under `base` ("" or "/ui")."""
    router = APIRouter(prefix=base, include_in_schema=False)
    static = _static_files()

    def login_redirect(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{base}/login?next={quote(target)}", status_code=303)

    def unauthorized() -> JSONResponse:
        body = {"error": {"code": "unauthorized", "message": "log in again"}}
        return JSONResponse(body, status_code=401)

    @router.get("/", response_class=HTMLResponse)
    async def runs(
        request: Request,
        status: Annotated[str | None, Query(max_length=20)] = None,
        q: Annotated[str | None, Query(max_length=128)] = None,
        cursor: Annotated[str | None, Query(max_length=400)] = None,
    ) -> Response:
        try:
            source = await get_source(request)
        except LoginRequired:
            return login_redirect(request)
        wanted = next((s for s in STATUSES if s == status), None)
        prefix = (q or "").strip() or None
        page = RunPage([], None)
        if prefix is None or RUN_ID.fullmatch(prefix):
            try:
                page = await source.list_runs(
                    status=wanted, prefix=prefix, cursor=cursor or None, limit=PAGE_SIZE
                )
            except InvalidRequest:  # a cursor from elsewhere: start again
                page = await source.list_runs(
                    status=wanted, prefix=prefix, cursor=None, limit=PAGE_SIZE
                )
        text = runs_page(page, base=base, viewer=source.viewer, status=wanted, prefix=prefix,
                         cursor=cursor)  # fmt: skip
        return _html(text)

    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run(request: Request, run_id: str) -> Response:
        try:
            source = await get_source(request)
        except LoginRequired:
            return login_redirect(request)
        try:
            record, status = await source.run(run_id)
        except NotFound as exc:
            return _html(not_found_page(str(exc), base=base, viewer=source.viewer), 404)
        outline = await source.outline(record)
        svg = to_svg(outline) if outline is not None else None
        return _html(run_page(record.run_id, record.graph, status, svg, base=base,
                              viewer=source.viewer))  # fmt: skip

    @router.get("/api/runs/{run_id}/state")
    async def state(request: Request, run_id: str) -> Response:
        try:
            source = await get_source(request)
        except LoginRequired:
            return unauthorized()
        return JSONResponse(await source.state(run_id), headers={"Cache-Control": "no-store"})

    @router.get("/api/runs/{run_id}/events")
    async def events(
        request: Request,
        run_id: str,
        after: Annotated[int, Query(ge=0)] = 0,
        last_event_id: Annotated[str | None, Header(max_length=20)] = None,
    ) -> Response:
        try:
            source = await get_source(request)
        except LoginRequired:
            return unauthorized()
        if last_event_id is not None and last_event_id.strip().isdigit():
            after = max(after, int(last_event_id.strip()))
        return await source.events(request, run_id, after)

    @router.post("/api/runs/{run_id}/input")
    async def answer(
        request: Request,
        run_id: str,
        content_type: Annotated[str | None, Header()] = None,
    ) -> Response:
        try:
            source = await get_source(request)
        except LoginRequired:
            return unauthorized()
        if not (content_type or "").startswith("application/json"):
            raise InvalidRequest("send the answer as JSON (Content-Type: application/json)")
        try:
            body: Any = json.loads(await request.body())
        except ValueError:
            raise InvalidRequest("the body is not JSON") from None
        if not isinstance(body, dict) or "value" not in body:
            raise InvalidRequest('expected {"value": ..., "node": ..., "key": ...}')
        node, key = body.get("node"), body.get("key")
        if not all(v is None or (isinstance(v, str) and 0 < len(v) <= 500) for v in (node, key)):
            raise InvalidRequest("node and key must be strings of 1 to 500 characters")
        out = await source.answer(run_id, body["value"], node, key)
        return JSONResponse(out, status_code=202)

    @router.get("/static/{name}")
    async def asset(name: str) -> Response:
        found = static.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        data, kind = found
        return Response(data, media_type=kind, headers={"Cache-Control": "no-cache"})

    return router
