"""One tenant must not be able to hurt another (issue 13): each test reproduces a finding of
an audit that attacked the daemon as a hostile tenant, against a real redis-server (and,
where sockets matter, a live uvicorn server with the daemon's own server settings)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from daemon_support import (
    Daemon,
    LiveServer,
    error_of,
    journal,
    make_config,
    open_daemon,
    submit,
)

from treadle.runtime.core.events import LLMCallFinished
from treadle.runtime.daemon.api.app import create_app

pytestmark = pytest.mark.anyio

#: a workflow without `models:` at all: its `default` is the runtime's fallback
PLAIN = """\
name: plain
inputs:
  topic: str
nodes:
  - {id: a, kind: llm, prompt: "About {t}", inputs: {t: $input.topic}}
outputs:
  a: $a
"""

#: a workflow whose own `default` model answers from its rule
OWN_RULES = """\
name: own
inputs:
  topic: str
models:
  default:
    backend: scripted
    rules: [{match: "About", content: "ANSWER"}]
nodes:
  - {id: a, kind: llm, prompt: "About {t}", inputs: {t: $input.topic}}
outputs:
  a: $a
"""


async def run_to_end(daemon: Daemon, key: str, workflow: str, inputs: dict[str, Any]) -> Any:
    async with daemon.client(key) as c:
        resp = await c.post("/v1/runs", json={"workflow": workflow, "inputs": inputs})
    assert resp.status_code == 201, resp.text
    return await daemon.wait_run(key, resp.json()["run_id"])


# -- finding 2: runs change each other's models ---------------------------------------------


async def test_a_tenants_run_does_not_change_another_tenants_models(daemon: Daemon) -> None:
    mallory = await daemon.tenant("mallory")
    alice = await daemon.tenant("alice")
    await daemon.register(mallory, PLAIN)
    await daemon.register(alice, OWN_RULES.replace("ANSWER", "alice's rule"))
    # mallory's run (no models at all) goes first on the one worker
    assert (await run_to_end(daemon, mallory, "plain", {"topic": "x"}))["status"] == "succeeded"
    done = await run_to_end(daemon, alice, "own", {"topic": "x"})
    assert done["output"] == {"a": "alice's rule"}, done


# -- finding 3: read_file reads the operator's directory ---------------------------------------

READER = """\
name: reader
inputs:
  path: str
nodes:
  - {id: read, kind: tool, tool: read_file, inputs: {path: $input.path}}
outputs:
  text: $read
"""


async def test_read_file_reads_nothing_without_a_root_for_the_tenant(daemon: Daemon) -> None:
    key = await daemon.tenant("mallory")
    await daemon.register(key, READER)
    for path in ("pyproject.toml", ".git/config", "README.md"):
        done = await run_to_end(daemon, key, "reader", {"path": path})
        assert done["status"] == "failed", done
        assert "no files" in done["error"] and "--files-root" in done["error"], done["error"]


async def test_read_file_is_confined_to_the_tenants_own_directory(
    redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "notes.txt").write_text("alice's notes")
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "secret.txt").write_text("bob's secret")
    (tmp_path / "operator.txt").write_text("the operator's")
    async for daemon in open_daemon(make_config(redis_url, files_root=str(tmp_path)), workers=1):
        key = await daemon.tenant("alice")
        await daemon.register(key, READER)
        ok = await run_to_end(daemon, key, "reader", {"path": "notes.txt"})
        assert ok["status"] == "succeeded" and ok["output"]["text"]["text"] == "alice's notes"
        for path in ("../bob/secret.txt", str(tmp_path / "bob" / "secret.txt"), "../operator.txt"):
            done = await run_to_end(daemon, key, "reader", {"path": path})
            assert done["status"] == "failed" and "outside the allowed root" in done["error"]
        # bob has no directory yet: nothing to read, and no fallback to anywhere else
        bob = await daemon.tenant("bob2")
        await daemon.register(bob, READER)
        done = await run_to_end(daemon, bob, "reader", {"path": "secret.txt"})
        assert done["status"] == "failed"


# -- finding 4: a lone surrogate is a 500 -----------------------------------------------------


async def test_text_that_cannot_be_encoded_is_a_422_naming_the_field(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key)
    headers = {"content-type": "application/json"}
    async with api_only.client(key) as c:
        run = await c.post(
            "/v1/runs",
            content=b'{"workflow": "five", "inputs": {"topic": "a\\ud800b"}}',
            headers=headers,
        )
        nested = await c.post(
            "/v1/runs",
            content=b'{"workflow": "five", "inputs": {"topic": "x", "deep": [{"\\udfff": 1}]}}',
            headers=headers,
        )
        definition = await c.post(
            "/v1/workflows", content=b'{"definition": "name: x\\ud800"}', headers=headers
        )
    status, code, message = error_of(run)
    assert (status, code) == (422, "invalid_request") and "inputs.topic" in message
    assert "surrogate" in message
    assert error_of(nested)[0] == 422 and "inputs.deep[0]" in error_of(nested)[2]
    assert error_of(definition)[0] == 422 and "definition" in error_of(definition)[2]


# -- finding 5: the event-stream limit is global -------------------------------------------------


@pytest.fixture
def small_limits(redis_url: str) -> Iterator[LiveServer]:
    """A live API (no worker: runs stay pending, so their streams stay open) with small
    per-tenant limits."""
    config = make_config(
        redis_url,
        max_event_streams=8,
        max_event_streams_per_tenant=2,
        tenant_rate_per_s=20.0,
        tenant_rate_burst=20,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
    )
    with LiveServer(create_app(config, workers=0)) as server:
        yield server


async def test_event_streams_are_limited_per_tenant(
    small_limits: LiveServer, redis_url: str
) -> None:
    server = small_limits
    async for helper in open_daemon(make_config(redis_url), workers=0):
        keys = {name: await helper.tenant(name) for name in ("mallory", "alice")}
        runs = {}
        for name, key in keys.items():
            await helper.register(key)
            runs[name] = await submit(helper, key, "five", "x")

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}"}

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        async with (
            c.stream("GET", f"/v1/runs/{runs['mallory']}/events", headers=auth("mallory")) as s1,
            c.stream("GET", f"/v1/runs/{runs['mallory']}/events", headers=auth("mallory")) as s2,
        ):
            assert (s1.status_code, s2.status_code) == (200, 200)
            third = await c.get(f"/v1/runs/{runs['mallory']}/events", headers=auth("mallory"))
            assert third.status_code == 429 and "retry-after" in third.headers
            assert "event streams" in third.json()["error"]["message"]
            async with c.stream(
                "GET", f"/v1/runs/{runs['alice']}/events", headers=auth("alice")
            ) as theirs:
                assert theirs.status_code == 200
        # mallory's streams are closed: she may open one again
        async with c.stream(
            "GET", f"/v1/runs/{runs['mallory']}/events", headers=auth("mallory")
        ) as again:
            assert again.status_code == 200


async def test_requests_in_progress_are_limited_per_tenant(redis_url: str) -> None:
    async for helper in open_daemon(make_config(redis_url), workers=0):
        mallory = await helper.tenant("mallory")
        alice = await helper.tenant("alice")
        await helper.register(mallory)
        run_id = await submit(helper, mallory, "five", "x")
    config = make_config(redis_url, tenant_max_in_flight=1)
    with LiveServer(create_app(config, workers=0)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            held = {"Authorization": f"Bearer {mallory}"}
            async with c.stream("GET", f"/v1/runs/{run_id}/events", headers=held) as stream:
                assert stream.status_code == 200  # in progress for as long as it is open
                second = await c.get("/v1/tenant", headers=held)
                assert second.status_code == 429 and "in progress" in second.text
                other = await c.get("/v1/tenant", headers={"Authorization": f"Bearer {alice}"})
                assert other.status_code == 200
            # the count comes back once the server has seen the stream close
            with anyio.fail_after(20):
                while (await c.get("/v1/tenant", headers=held)).status_code != 200:
                    await anyio.sleep(0.05)


# -- finding 6: half-sent requests are never timed out --------------------------------------------


def _read_until_closed(sock: socket.socket, patience_s: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection; fails (TimeoutError) if
    it keeps the connection open longer than `patience_s`."""
    sock.settimeout(patience_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_sent_requests_are_closed(small_limits: LiveServer) -> None:
    server = small_limits
    sockets = []
    try:
        for i in range(40):
            sock = socket.create_connection(("127.0.0.1", server.port))
            # headers that never end: a slow client, or a hostile one holding the socket
            sock.sendall(b"GET /v1/tenant HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * i)
            sockets.append(sock)
        for sock in sockets:
            answer = _read_until_closed(sock)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
        # a body that never arrives in full: 408, and the connection is closed
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"workflow": '
            )
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"request_timeout" in answer
        # the server still answers everybody else
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        for sock in sockets:
            sock.close()


# -- finding 7: a burst degrades others ---------------------------------------------------------


async def test_a_tenants_burst_is_refused_without_touching_others(redis_url: str) -> None:
    config = make_config(redis_url, tenant_rate_per_s=5.0, tenant_rate_burst=5)
    async for daemon in open_daemon(config, workers=0):
        mallory = await daemon.tenant("mallory")
        alice = await daemon.tenant("alice")
        tenants = daemon.services.tenants
        authenticated = 0
        real = tenants.authenticate

        async def counting(token: str, real: Any = real) -> Any:
            nonlocal authenticated
            authenticated += 1
            return await real(token)

        tenants.authenticate = counting  # type: ignore[method-assign]
        async with daemon.client(mallory) as m:
            burst = [(await m.get("/v1/tenant")).status_code for _ in range(30)]
            refused = await m.get("/v1/tenant")
        assert burst.count(200) <= 6 and burst.count(429) >= 24, burst
        # a known key past its rate is refused before authenticating (no Redis round trip)
        assert authenticated <= 8, authenticated
        status, code, message = error_of(refused)
        assert (status, code) == (429, "rate_limited") and "requests per second" in message
        assert int(refused.headers["retry-after"]) >= 1
        async with daemon.client(alice) as a:
            assert [(await a.get("/v1/tenant")).status_code for _ in range(5)] == [200] * 5


# -- finding 8: the prefix cache as a side channel -------------------------------------------------

SHARED_MODEL = """\
name: probe
inputs:
  topic: str
nodes:
  - id: a
    kind: llm
    model: shared
    max_tokens: 4
    prompt: "SECRET {t}"
    inputs: {t: $input.topic}
outputs:
  a: $a
"""


async def _cached_tokens(daemon: Daemon, key: str, topic: str) -> int:
    done = await run_to_end(daemon, key, "probe", {"topic": topic})
    assert done["status"] == "succeeded", done
    events = await journal(daemon.services.store, done["run_id"])
    return sum(e.cached_prompt_tokens for e in events if isinstance(e, LLMCallFinished))


async def test_tenants_do_not_share_a_prefix_cache(redis_url: str) -> None:
    config = make_config(redis_url, models={"shared": {"backend": "sim", "speed": 1000.0}})
    async for daemon in open_daemon(config, workers=1):
        alice = await daemon.tenant("alice")
        mallory = await daemon.tenant("mallory")
        await daemon.register(alice, SHARED_MODEL)
        await daemon.register(mallory, SHARED_MODEL)
        topic = "the merger of acme and globex, " * 8
        await _cached_tokens(daemon, alice, topic)
        # alice's own second run hits her cache; mallory's identical prompt does not
        assert await _cached_tokens(daemon, alice, topic) > 0
        assert await _cached_tokens(daemon, mallory, topic) == 0


# -- finding 9: OPTIONS / Allow, and bodies that are not JSON -------------------------------------


async def test_options_and_405_name_every_method_of_the_path(api_only: Daemon) -> None:
    async with api_only.client() as c:
        options = await c.options("/v1/runs")
        put = await c.put("/v1/runs")
        options_run = await c.options("/v1/runs/abc")
        missing = await c.options("/v1/nothing-here")
    assert options.status_code == 204
    assert set(options.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    assert put.status_code == 405 and error_of(put)[1] == "method_not_allowed"
    assert set(put.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    assert set(options_run.headers["allow"].split(", ")) == {"GET", "OPTIONS"}
    assert missing.status_code == 404


def _documented(app: Any, method: str, path: str) -> set[int]:
    operation = app.openapi()["paths"][path][method.lower()]
    return {int(code) for code in operation["responses"] if code.isdigit()}


async def test_bodies_that_are_not_json_get_documented_errors(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    async with api_only.client(key) as c:
        for path in ("/v1/runs", "/v1/workflows"):
            text = await c.post(path, content=b"hello", headers={"content-type": "text/plain"})
            broken = await c.post(
                path, content=b'{"workflow": ', headers={"content-type": "application/json"}
            )
            status, code, message = error_of(text)
            assert (status, code) == (415, "unsupported_media_type"), text.text
            assert "application/json" in message
            status, code, message = error_of(broken)
            assert (status, code) == (400, "bad_request") and "not valid JSON" in message
            assert {400, 415} <= _documented(api_only.app, "POST", path)


def test_every_documented_operation_lists_the_limits_it_can_answer() -> None:
    from treadle.runtime.daemon.config import DaemonConfig

    app = create_app(DaemonConfig())
    for path, operations in app.openapi()["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, operation in operations.items():
            codes = {int(c) for c in operation["responses"] if c.isdigit()}
            assert {401, 429, 503} <= codes, (method, path, codes)


# -- definitions are loaded outside the API's process ------------------------------------------


def big_definition(nodes: int) -> str:
    lines = ["name: big", "inputs:", "  topic: str", "nodes:"]
    lines.append('  - {id: n0, kind: llm, prompt: "About {t}", inputs: {t: $input.topic}}')
    for i in range(1, nodes):
        lines.append(f'  - {{id: n{i}, kind: llm, prompt: "Step {{x}}", inputs: {{x: $n{i - 1}}}}}')
    return "\n".join([*lines, "outputs:", f"  r: $n{nodes - 1}"]) + "\n"


async def test_definitions_load_in_the_checker_process_within_its_time_limit(
    redis_url: str,
) -> None:
    config = make_config(redis_url, check_timeout_s=1.0)
    async for daemon in open_daemon(config, workers=0):
        key = await daemon.tenant("mallory")
        async with daemon.client(key) as c:
            heavy = await c.post("/v1/workflows", json={"definition": big_definition(2500)})
            status, code, message = error_of(heavy)
            assert (status, code) == (422, "invalid_workflow") and "longer than 1 s" in message
            # the checker was replaced: the next definition is checked as usual
            assert (await c.post("/v1/workflows", json={"definition": PLAIN})).status_code == 201
            run = await c.post("/v1/runs", json={"workflow": "plain", "inputs": {"topic": "x"}})
            assert run.status_code == 201, run.text
            bad = await c.post("/v1/runs", json={"workflow": "plain", "inputs": {"topic": 1}})
            assert error_of(bad)[0] == 422 and "topic" in error_of(bad)[2]
        # nothing was compiled in this (the API's) process
        assert not daemon.services.registry._cache
