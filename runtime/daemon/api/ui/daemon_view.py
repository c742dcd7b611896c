"""The web view on the daemon, under `/ui`: log in with an API key, see that tenant's runs.

Logging in checks the key as the API does (`TenantStore.authenticate`) and starts a
session: a random id in an HttpOnly, SameSite=Strict cookie scoped to `/ui`, stored in
Redis only as its SHA-256 (`treadle:uisession:<digest>` → the key's id, for `SESSION_S`).
Every request looks the key up again, so revoking the key or its tenant ends its sessions
at once. The cookie is `Secure` when the request came over HTTPS (directly, or as
`X-Forwarded-Proto` says behind a proxy).
"""

from __future__ import annotations

import hashlib
import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from treadle.runtime.daemon.api.ui.pages import login_page
from treadle.runtime.daemon.api.ui.routes import _SECURITY, LoginRequired, ui_router
from treadle.runtime.daemon.api.ui.source import DaemonSource, RunSource
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.tenants import TOKEN, ApiKey, Tenant

BASE = "/ui"
COOKIE = "treadle_ui"
#: how long a session lasts after logging in (s)
SESSION_S = 12 * 3600
_MAX_FORM = 4096


def _session_key(services: Services, session_id: str) -> str:
    digest = hashlib.sha256(session_id.encode()).hexdigest()
    return f"{services.config.prefix}:uisession:{digest}"


async def _tenant_of(services: Services, request: Request) -> Tenant | None:
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 100:
        return None
    key_id = await services.redis.get(_session_key(services, session_id))
    if key_id is None:
        return None
    raw = await services.redis.hget(services.keys.api_keys(), key_id)
    if raw is None:
        return None
    try:
        key = ApiKey.model_validate_json(raw)
    except ValidationError:
        return None
    tenant = await services.tenants.get(key.tenant)
    if key.revoked or tenant is None or tenant.revoked:
        return None
    return tenant


async def _source(request: Request) -> RunSource:
    services: Services = request.app.state.services
    tenant = await _tenant_of(services, request)
    if tenant is None:
        raise LoginRequired("no session")
    return DaemonSource(services, tenant)


def _safe_next(target: str) -> str:
    """Only a path of this view (never another site: an open redirect)."""
    if target.startswith(BASE + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return BASE + "/"


def _https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or forwarded.split(",")[0].strip() == "https"


def _login_routes() -> APIRouter:
    router = APIRouter(prefix=BASE, include_in_schema=False)

    @router.get("/login", response_class=HTMLResponse)
    async def login_form(next: str = BASE + "/") -> HTMLResponse:
        return HTMLResponse(login_page(base=BASE, error=None, next_url=_safe_next(next)),
                            headers=_SECURITY)  # fmt: skip

    @router.post("/login")
    async def login(request: Request) -> Response:
        services: Services = request.app.state.services
        raw = await request.body()
        form = parse_qs(raw[:_MAX_FORM].decode("utf-8", "replace"))
        token = (form.get("key") or [""])[0].strip()
        target = _safe_next((form.get("next") or [BASE + "/"])[0])
        tenant = await services.tenants.authenticate(token) if token else None
        if tenant is None:
            page = login_page(base=BASE, error="That API key is not valid.", next_url=target)
            return HTMLResponse(page, status_code=401, headers=_SECURITY)
        session_id = secrets.token_urlsafe(32)
        match = TOKEN.fullmatch(token)
        assert match is not None  # (authenticate refuses any other form)
        key_id = match[1]
        await services.redis.set(_session_key(services, session_id), key_id, ex=SESSION_S)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, session_id, max_age=SESSION_S, path=BASE, httponly=True,
            samesite="strict", secure=_https(request),
        )  # fmt: skip
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        services: Services = request.app.state.services
        session_id = request.cookies.get(COOKIE)
        if session_id and len(session_id) <= 100:
            await services.redis.delete(_session_key(services, session_id))
        response = RedirectResponse(f"{BASE}/login", status_code=303)
        response.delete_cookie(COOKIE, path=BASE)
        return response

    return router


def mount(app: FastAPI) -> None:
    """Add the web view's routes to the daemon's app (`/ui`)."""
    app.include_router(_login_routes())
    app.include_router(ui_router(_source, base=BASE))
