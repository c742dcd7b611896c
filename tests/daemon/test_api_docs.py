"""The API's own documentation (14.16): `/docs` serves Swagger UI from the package (no
CDN: the daemon may have no internet), and docs/daemon-api.md lists every endpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from daemon_support import Daemon

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parents[2] / "docs" / "daemon-api.md"


async def test_docs_page_and_its_assets_come_from_the_daemon(api_only: Daemon) -> None:
    async with api_only.client() as c:
        page = await c.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assert assets, page.text
        for url in assets:
            assert url.startswith("/"), f"{url} is not served by the daemon"
            served = await c.get(url)
            assert served.status_code == 200, url
            assert len(served.content) > 100
        assert "/openapi.json" in page.text
        assert (await c.get("/openapi.json")).status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text


def test_every_endpoint_is_in_the_api_document() -> None:
    from treadle.runtime.daemon.api.app import create_app
    from treadle.runtime.daemon.config import DaemonConfig

    app = create_app(DaemonConfig(redis_url="redis://localhost:1"))
    endpoints = [
        f"{method.upper()} {path}"
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    ]
    endpoints += ["GET /openapi.json", "GET /docs"]  # outside the schema
    assert len(endpoints) >= 12
    text = DOC.read_text()
    missing = [e for e in endpoints if f"### `{e}`" not in text]
    assert not missing, f"docs/daemon-api.md does not describe: {missing}"
