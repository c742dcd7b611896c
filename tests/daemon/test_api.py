"""The HTTP API over ASGI: registering workflows, submitting, reading and listing runs,
authentication, quotas, size limits, trace context and error bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from daemon_support import FIVE, Daemon, error_of, wait_for

from treadle.runtime.daemon.quotas import current_minute

pytestmark = pytest.mark.anyio


async def chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_register_get_and_list_workflows(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    info = await api_only.register(key)
    assert (info["name"], info["version"]) == ("five", 1)
    assert info["inputs"] == {"topic": {"type": "str", "required": True}}
    assert info["nodes"] == ["outline", "part1", "part2", "merge", "title"]
    again = await api_only.register(key)  # same text: same version
    assert (again["version"], again["digest"]) == (1, info["digest"])
    changed = await api_only.register(key, FIVE.replace("Outline {topic}", "Plan {topic}"))
    assert changed["version"] == 2 and changed["digest"] != info["digest"]
    async with api_only.client(key) as c:
        listed = (await c.get("/v1/workflows")).json()["workflows"]
        detail = (await c.get("/v1/workflows/five")).json()
        missing = await c.get("/v1/workflows/nope")
    assert [w["name"] for w in listed] == ["five"]
    assert "Plan {topic}" in detail["definition"]
    assert error_of(missing)[:2] == (404, "not_found")


@pytest.mark.parametrize(
    ("definition", "fmt", "expected"),
    [
        ("name: x\nnodes:\n  - {id: a, kind: llm prompt: hi}\n", "yaml", "x.yaml:3:"),
        ('{"name": "x", "nodes": [}', "json", "x.yaml:1:"),
        ("name: x\nnodes:\n  - {id: a, kind: llm, prompt: hi, bogus: 1}\n", "yaml", "bogus"),
        (
            "name: x\nnodes:\n  - {id: a, kind: llm, prompt: '{q}', inputs: {q: $nope}}\n",
            "yaml",
            "nope",
        ),
    ],
)
async def test_invalid_definitions_are_422_with_where(
    api_only: Daemon, definition: str, fmt: str, expected: str
) -> None:
    key = await api_only.tenant("acme")
    async with api_only.client(key) as c:
        body = {"definition": definition, "format": fmt, "filename": "x.yaml"}
        resp = await c.post("/v1/workflows", json=body)
    status, code, message = error_of(resp)
    assert (status, code) == (422, "invalid_workflow")
    assert expected in message


async def test_import_paths_outside_the_allow_list_are_refused(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    bad = [
        "name: x\nnodes:\n  - {id: a, kind: func, fn: 'os:system'}\n",
        "name: x\nnodes:\n  - {id: a, kind: tool, tool: 'subprocess:run'}\n",
        "name: x\ninputs:\n  q: 'list[shutil:Foo]'\nnodes: []\n",
        "name: x\nnodes:\n  - {id: a, kind: subgraph, graph: other.yaml}\n",
        "name: x\nmodels:\n  m: {backend: openai_compat, base_url: 'http://x', model: m}\n"
        "nodes: []\n",
    ]
    async with api_only.client(key) as c:
        for definition in bad:
            resp = await c.post("/v1/workflows", json={"definition": definition})
            assert error_of(resp)[:2] == (422, "invalid_workflow"), definition
        listed = (await c.get("/v1/workflows")).json()["workflows"]
    assert listed == []


async def test_submit_get_and_finish(daemon: Daemon) -> None:
    key = await daemon.tenant("acme")
    await daemon.register(key)
    async with daemon.client(key) as c:
        resp = await c.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "bees"}})
    assert resp.status_code == 201, resp.text
    run = resp.json()
    assert resp.headers["location"] == f"/v1/runs/{run['run_id']}"
    assert (run["status"], run["workflow"], run["workflow_version"]) == ("pending", "five", 1)
    final = await daemon.wait_run(key, run["run_id"])
    assert final["status"] == "succeeded", final
    assert set(final["output"]) == {"title", "body"}


async def test_a_submitted_run_is_what_the_store_and_the_queue_read(api_only: Daemon) -> None:
    """Submitting writes the record and the queue entry in one transaction of its own; the
    store and the work queue must read them exactly as if they had written them."""
    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key)
    async with api_only.client(key) as c:
        resp = await c.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "t"}})
    run_id = resp.json()["run_id"]
    record = await services.store.get_run(run_id)
    assert record is not None
    assert (record.run_id, record.tenant, record.status, record.inputs) == (
        run_id,
        "acme",
        "pending",
        {"topic": "t"},
    )
    assert [r.run_id for r in await services.store.list_runs(tenant="acme")] == [run_id]
    assert [r.run_id for r in await services.store.list_runs()] == [run_id]
    job = await services.queue.claim("inspector")
    assert job is not None and (job.run_id, job.payload) == (run_id, {})


async def test_bad_submissions(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key)
    async with api_only.client(key) as c:
        cases = {
            "wrong input type": ({"workflow": "five", "inputs": {"topic": 3}}, 422),
            "missing input": ({"workflow": "five", "inputs": {}}, 422),
            "unknown workflow": ({"workflow": "six", "inputs": {}}, 404),
            "extra field": ({"workflow": "five", "inputs": {"topic": "x"}, "x": 1}, 422),
            "inputs not an object": ({"workflow": "five", "inputs": [1]}, 422),
        }
        for label, (body, status) in cases.items():
            resp = await c.post("/v1/runs", json=body)
            assert error_of(resp)[0] == status, label
        not_json = await c.post(
            "/v1/runs", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert error_of(not_json)[:2] == (400, "bad_request")
        assert error_of(await c.get("/v1/nowhere"))[:2] == (404, "not_found")
        assert error_of(await c.delete("/v1/runs"))[:2] == (405, "method_not_allowed")
        assert error_of(await c.get("/v1/runs", params={"limit": 0}))[0] == 422
        assert error_of(await c.get("/v1/runs", params={"status": "bogus"}))[0] == 422
        assert error_of(await c.get("/v1/runs", params={"cursor": "!!"}))[0] == 422
    # Python's JSON parser takes NaN; the run's record must stay JSON, so it is refused
    floats = (
        "name: f\ninputs:\n  x: float\n"
        "nodes:\n  - {id: a, kind: llm, prompt: '{x}', inputs: {x: $input.x}}\n"
    )
    await api_only.register(key, floats)
    async with api_only.client(key) as c:
        for raw in (b"NaN", b"-Infinity", b"1e999"):
            body = b'{"workflow": "f", "inputs": {"x": ' + raw + b"}}"
            resp = await c.post(
                "/v1/runs", content=body, headers={"content-type": "application/json"}
            )
            status, _code, message = error_of(resp)
            assert status == 422 and "inputs.x" in message


async def test_authentication(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.tenant("other")
    bad_keys = [None, "nonsense", key[:-1] + ("A" if key[-1] != "A" else "B"), "trd_" + "0" * 12]
    for bad in bad_keys:
        async with api_only.client(bad) as c:
            resp = await c.get("/v1/runs")
        assert error_of(resp)[:2] == (401, "unauthorized"), bad
        assert resp.headers["www-authenticate"].startswith("Bearer")
    async with api_only.client() as c:
        ok = await c.get("/v1/runs", headers={"X-API-Key": key})
    assert ok.status_code == 200
    # revoking the key, then the tenant: both lock the caller out at once
    second = (await api_only.services.tenants.issue_key("acme")).token
    await api_only.services.tenants.revoke_key(key.split("_")[1])
    async with api_only.client(key) as c:
        assert (await c.get("/v1/runs")).status_code == 401
    async with api_only.client(second) as c:
        assert (await c.get("/v1/runs")).status_code == 200
    await api_only.services.tenants.revoke_tenant("acme")
    async with api_only.client(second) as c:
        assert (await c.get("/v1/runs")).status_code == 401
    async with api_only.client(api_only.keys["other"]) as c:
        assert (await c.get("/v1/runs")).status_code == 200


async def test_listing_pages_and_filters(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key)
    await api_only.register(key, FIVE.replace("name: five", "name: other"))
    ids = []
    async with api_only.client(key) as c:
        for i in range(7):
            wf = "five" if i % 2 == 0 else "other"
            resp = await c.post("/v1/runs", json={"workflow": wf, "inputs": {"topic": str(i)}})
            ids.append(resp.json()["run_id"])
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (await c.get("/v1/runs", params=params)).json()
            seen += [r["run_id"] for r in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        # a run submitted between pages does not shift them
        assert seen == ids[::-1]
        fives = (await c.get("/v1/runs", params={"workflow": "five"})).json()["runs"]
        assert [r["run_id"] for r in fives] == ids[::-2]
        pending = (await c.get("/v1/runs", params={"status": "pending", "limit": 500})).json()
        assert len(pending["runs"]) == 7
        done = (await c.get("/v1/runs", params={"status": "succeeded"})).json()
        assert done == {"runs": [], "next_cursor": None}


async def test_concurrent_runs_quota(api_only: Daemon) -> None:
    key = await api_only.tenant("small", max_concurrent_runs=2)
    other = await api_only.tenant("big")
    await api_only.register(key)
    await api_only.register(other)
    body = {"workflow": "five", "inputs": {"topic": "x"}}
    async with api_only.client(key) as c:
        assert (await c.post("/v1/runs", json=body)).status_code == 201
        assert (await c.post("/v1/runs", json=body)).status_code == 201
        refused = await c.post("/v1/runs", json=body)
        assert error_of(refused)[:2] == (429, "quota_exceeded")
        assert int(refused.headers["retry-after"]) >= 1
        usage = (await c.get("/v1/tenant")).json()
        assert usage["active_runs"] == 2
    async with api_only.client(other) as c:  # another tenant's quota is its own
        assert (await c.post("/v1/runs", json=body)).status_code == 201


async def test_quota_frees_up_when_runs_settle(daemon: Daemon) -> None:
    key = await daemon.tenant("small", max_concurrent_runs=1)
    await daemon.register(key)
    body = {"workflow": "five", "inputs": {"topic": "x"}}
    async with daemon.client(key) as c:

        async def slot_free() -> bool:
            return bool((await c.get("/v1/tenant")).json()["active_runs"] == 0)

        for _ in range(3):  # each run must settle (and free its slot) before the next
            resp = await c.post("/v1/runs", json=body)
            assert resp.status_code == 201, resp.text
            assert (await daemon.wait_run(key, resp.json()["run_id"]))["status"] == "succeeded"
            await wait_for(slot_free, timeout_s=5)


async def test_tokens_per_minute_quota(daemon: Daemon) -> None:
    key = await daemon.tenant("metered", tokens_per_minute=30)
    await daemon.register(key)
    body = {"workflow": "five", "inputs": {"topic": "x"}}
    async with daemon.client(key) as c:
        first = await c.post("/v1/runs", json=body)
        assert first.status_code == 201
        assert (await daemon.wait_run(key, first.json()["run_id"]))["status"] == "succeeded"

        # the worker counts the run's tokens (five LLM calls: well over 30), in batches
        async def counted() -> bool:
            return bool((await c.get("/v1/tenant")).json()["tokens_this_minute"] > 30)

        await wait_for(counted, timeout_s=5)
        refused = await c.post("/v1/runs", json=body)
        status, code, message = error_of(refused)
        assert (status, code) == (429, "quota_exceeded") and "tokens" in message
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    # next minute's counter is a fresh one
    next_minute = daemon.services.keys.tokens("metered", current_minute() + 1)
    assert await daemon.services.redis.get(next_minute) is None


async def test_request_size_limits(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key)
    big = json.dumps({"workflow": "five", "inputs": {"topic": "x" * (2 << 20)}}).encode()
    async with api_only.client(key) as c:
        resp = await c.post("/v1/runs", content=big, headers={"content-type": "application/json"})
        assert error_of(resp)[:2] == (413, "request_too_large")
        # no Content-Length (chunked): refused as soon as it passes the limit
        resp = await c.post(
            "/v1/runs", content=chunks(big), headers={"content-type": "application/json"}
        )
        assert error_of(resp)[:2] == (413, "request_too_large")
        small = json.dumps({"workflow": "five", "inputs": {"topic": "y"}}).encode()
        resp = await c.post(
            "/v1/runs", content=chunks(small, 7), headers={"content-type": "application/json"}
        )
        assert resp.status_code == 201, resp.text
        # a definition over the registry's own limit (the body limit is larger)
        huge = "name: x\ndescription: '" + "d" * (300 * 1024) + "'\nnodes: []\n"
        resp = await c.post("/v1/workflows", json={"definition": huge})
        status, _code, message = error_of(resp)
        assert status == 422 and "larger than" in message


async def test_traceparent_is_kept_with_the_run(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body = {"workflow": "five", "inputs": {"topic": "x"}}
    async with api_only.client(key) as c:
        resp = await c.post(
            "/v1/runs", json=body, headers={"traceparent": parent, "tracestate": "k=v"}
        )
        invalid = await c.post("/v1/runs", json=body, headers={"traceparent": "00-zz-1-01"})
    assert resp.json()["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    record = await api_only.services.store.get_run(resp.json()["run_id"])
    assert record is not None and record.meta["traceparent"] == parent
    assert record.meta["tracestate"] == "k=v"
    assert invalid.status_code == 201 and invalid.json()["trace_id"] is None


async def test_health_metrics_and_docs(daemon: Daemon) -> None:
    key = await daemon.tenant("acme")
    await daemon.register(key)
    async with daemon.client(key) as c:
        run = (await c.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "m"}})).json()
    await daemon.wait_run(key, run["run_id"])
    async with daemon.client() as c:
        assert (await c.get("/healthz")).json() == {"status": "ok", "redis": "ok"}
        metrics = (await c.get("/metrics")).text
        assert (await c.get("/docs")).status_code == 200
        schema = (await c.get("/openapi.json")).json()
    assert (
        'treadle_runs_finished_total{graph="five",status="succeeded",tenant="acme"} 1.0' in metrics
    )
    assert 'route="/v1/runs/{run_id}"' in metrics
    assert "treadle_queue_entries" in metrics
    assert "/v1/runs/{run_id}/events" in schema["paths"]
