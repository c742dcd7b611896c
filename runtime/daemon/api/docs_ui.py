"""`/docs`: the API's Swagger UI, its scripts and styles served by the daemon itself.

FastAPI's default page loads Swagger UI from a CDN, which a daemon on a private network (or
a browser that blocks third-party scripts) cannot reach; the assets are vendored in
`swagger_ui/` (swagger-ui-dist, Apache-2.0: see its `UPSTREAM.md`) and served under
`/docs/static/`. ReDoc is not offered (it would need its own vendored bundle).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "swagger_ui"
STATIC = "/docs/static"


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at `/docs` from the package (create `app` with `docs_url=None`)."""
    app.mount(STATIC, StaticFiles(directory=ASSETS), name="swagger-ui")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC}/favicon-32x32.png",
        )
