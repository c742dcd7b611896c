"""The web view without a browser: logging in, sessions and their end, one tenant never
seeing another's runs, the JSON routes' guards; and `treadle ui` over a local SQLite store
(list, search, state, answering a waiting run, which the view then resumes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import typer
from typer.testing import CliRunner
from ui_support import ASK, ViewDaemon, view_daemon

from treadle.graphs.compile import compile_graph
from treadle.graphs.files.loader import load_workflow
from treadle.runtime.daemon.api.ui.local import create_local_app
from treadle.runtime.daemon.cli import register
from treadle.runtime.execution.runtime import Runtime
from treadle.runtime.stores.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def daemon(redis_url: str) -> Iterator[ViewDaemon]:
    yield from view_daemon(redis_url)


@contextmanager
def login(url: str, key: str, target: str = "/ui/") -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        resp = client.post("/ui/login", data={"key": key, "next": target})
        assert resp.status_code == 303, resp.text
        yield client


def test_login_sessions_and_tenant_scope(daemon: ViewDaemon) -> None:
    acme, beta = daemon.tenant("acme"), daemon.tenant("beta")
    run_id = daemon.submit(acme, ASK, {"topic": "scope"})
    with httpx.Client(base_url=daemon.url) as anon:
        resp = anon.get("/ui/")
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/login?next=/ui/"
        assert anon.get(f"/ui/api/runs/{run_id}/state").status_code == 401
        assert anon.post("/ui/login", data={"key": "trd_nope"}).status_code == 401
        assert anon.post("/ui/login", data={"key": beta[:-1] + "x"}).status_code == 401
        # only a path of the view is followed after logging in (no open redirect)
        resp = anon.post("/ui/login", data={"key": acme, "next": "https://evil.example/"})
        assert resp.headers["location"] == "/ui/"
        cookie = resp.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    with login(daemon.url, acme) as mine:
        page = mine.get("/ui/")
        assert page.status_code == 200 and run_id in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert mine.get(f"/ui/?q={run_id[:5]}").text.count(f"/ui/runs/{run_id}") == 1
        assert mine.get(f"/ui/runs/{run_id}").status_code == 200
        state = mine.get(f"/ui/api/runs/{run_id}/state").json()
        assert state["run"]["run_id"] == run_id
        assert [n["id"] for n in state["nodes"]] == ["draft", "check", "publish"]
        # answers are JSON only (a form on another site cannot post JSON)
        resp = mine.post(f"/ui/api/runs/{run_id}/input", data={"value": "x"})
        assert resp.status_code == 422
    with login(daemon.url, beta) as other:
        assert run_id not in other.get("/ui/").text
        assert other.get(f"/ui/runs/{run_id}").status_code == 404
        assert other.get(f"/ui/api/runs/{run_id}/state").status_code == 404
        assert other.get(f"/ui/api/runs/{run_id}/events").status_code == 404
        resp = other.post(f"/ui/api/runs/{run_id}/input", json={"value": {"approved": True}})
        assert resp.status_code == 404
        # logging out ends the session
        assert other.post("/ui/logout").status_code == 303
        assert other.get("/ui/").status_code == 303
    # revoking the key ends its sessions at once
    with login(daemon.url, acme) as mine:
        assert mine.get("/ui/").status_code == 200
        admin = typer.Typer()
        register(admin)
        key_id = acme.split("_")[1]
        revoked = CliRunner().invoke(
            admin, ["tenants", "revoke", "acme", "--key", key_id, "--redis", daemon.redis_url]
        )
        assert revoked.exit_code == 0, revoked.stderr
        assert mine.get("/ui/").status_code == 303


@pytest.mark.anyio
async def test_local_view_lists_shows_and_answers(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    source = str(REPO / "examples" / "approval.yaml")
    cg = compile_graph(load_workflow(source))
    store = SqliteStore(db)
    runtime = Runtime(store=store)
    waiting = await runtime.run(cg, {}, source=source, check=False)
    assert waiting.status == "waiting"
    await runtime.aclose()
    app = create_local_app(db, lambda ref: compile_graph(load_workflow(ref)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ui") as c:
            listed = await c.get("/", params={"status": "waiting", "q": waiting.run_id[:8]})
            assert listed.status_code == 200 and f"/runs/{waiting.run_id}" in listed.text
            assert f"/runs/{waiting.run_id}" not in (await c.get("/?status=failed")).text
            page = await c.get(f"/runs/{waiting.run_id}")
            assert page.status_code == 200 and 'data-node="approve"' in page.text
            assert (await c.get("/runs/nope")).status_code == 404
            state = (await c.get(f"/api/runs/{waiting.run_id}/state")).json()
            assert state["run"]["status"] == "waiting"
            assert state["run"]["pending_inputs"][0]["node"] == "approve"
            bad = await c.post(f"/api/runs/{waiting.run_id}/input", json={"value": {"x": 1}})
            assert bad.status_code == 422
            answer = {"value": {"approved": False, "comment": "not today"}, "key": "k1"}
            resp = await c.post(f"/api/runs/{waiting.run_id}/input", json=answer)
            assert resp.status_code == 202 and resp.json()["status"] == "running"
            deadline = time.monotonic() + 20
            while True:  # the view resumes the run itself
                state = (await c.get(f"/api/runs/{waiting.run_id}/state")).json()
                if state["run"]["status"] != "waiting" and state["run"]["status"] != "running":
                    break
                assert time.monotonic() < deadline
                await anyio.sleep(0.05)
            assert state["run"]["status"] == "succeeded"
            statuses = {n["id"]: n["status"] for n in state["nodes"]}
            assert statuses["approve"] == "done" and statuses["delete"] == "skipped"
            assert state["timeline"]["rows"]


def test_treadle_ui_needs_a_store(tmp_path: Path) -> None:
    from treadle.cli.main import app

    result = CliRunner().invoke(app, ["ui", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and "no run store at" in result.stderr
