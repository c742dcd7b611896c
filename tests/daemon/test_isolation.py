"""Tenants are isolated on every endpoint: another tenant's workflows and runs answer 404
exactly as ids that do not exist, are missing from listings, and cannot be changed."""

from __future__ import annotations

import uuid

import pytest
from daemon_support import FIVE, Daemon, error_of

pytestmark = pytest.mark.anyio

#: every /v1 route this test attacks; a new route fails the test until it is added here
COVERED = {
    ("POST", "/v1/workflows"),
    ("GET", "/v1/workflows"),
    ("GET", "/v1/workflows/{name}"),
    ("GET", "/v1/workflows/{name}/versions"),
    ("GET", "/v1/workflows/{name}/versions/{version}"),
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/{run_id}"),
    ("POST", "/v1/runs/{run_id}/cancel"),
    ("POST", "/v1/runs/{run_id}/input"),
    ("GET", "/v1/runs/{run_id}/events"),
    ("GET", "/v1/tenant"),
}


async def test_every_endpoint_refuses_other_tenants(api_only: Daemon) -> None:
    routes = {
        (method.upper(), path)
        for path, operations in api_only.app.openapi()["paths"].items()
        if path.startswith("/v1")
        for method in operations
    }
    assert routes == COVERED, "add the new route's cross-tenant attack to this test"

    alice = await api_only.tenant("alice")
    bob = await api_only.tenant("bob")
    await api_only.register(alice, FIVE.replace("Outline", "Alice's outline"))
    await api_only.register(alice, FIVE.replace("Outline", "Alice's second outline"))
    async with api_only.client(alice) as a:
        run = (await a.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "x"}})).json()
    run_id = run["run_id"]
    ghost = uuid.uuid4().hex  # an id nobody has

    async with api_only.client(bob) as b:
        # runs: read, cancel, stream -> 404, indistinguishable from an unknown id
        for method, path, body in [
            ("GET", "/v1/runs/{}", None),
            ("POST", "/v1/runs/{}/cancel", None),
            ("POST", "/v1/runs/{}/input", {"value": True, "key": "k"}),
            ("GET", "/v1/runs/{}/events", None),
        ]:
            theirs = await b.request(method, path.format(run_id), json=body)
            nobodys = await b.request(method, path.format(ghost), json=body)
            assert error_of(theirs)[:2] == (404, "not_found"), path
            assert error_of(theirs)[2].replace(run_id, "ID") == error_of(nobodys)[2].replace(
                ghost, "ID"
            )
        # listings hold only bob's own things
        assert (await b.get("/v1/runs")).json() == {"runs": [], "next_cursor": None}
        assert (await b.get("/v1/runs", params={"workflow": "five"})).json()["runs"] == []
        assert (await b.get("/v1/workflows")).json() == {"workflows": []}
        # alice's workflow name means nothing to bob
        assert error_of(await b.get("/v1/workflows/five"))[:2] == (404, "not_found")
        assert error_of(await b.get("/v1/workflows/five/versions"))[:2] == (404, "not_found")
        assert error_of(await b.get("/v1/workflows/five/versions/1"))[:2] == (404, "not_found")
        submit = await b.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "x"}})
        assert error_of(submit)[:2] == (404, "not_found")
        pinned = {"workflow": "five", "inputs": {"topic": "x"}, "version": 1}
        assert error_of(await b.post("/v1/runs", json=pinned))[:2] == (404, "not_found")
        # registering the same name gives bob his own workflow, leaving alice's alone
        mine = await b.post("/v1/workflows", json={"definition": FIVE})
        assert mine.status_code == 201 and mine.json()["version"] == 1
        assert (await b.get("/v1/tenant")).json()["tenant"] == "bob"

    async with api_only.client(alice) as a:
        detail = (await a.get("/v1/workflows/five")).json()
        assert detail["version"] == 2 and "Alice's second outline" in detail["definition"]
        after = (await a.get(f"/v1/runs/{run_id}")).json()
        assert after["status"] == "pending" and after["cancel_requested"] is False
        assert (await a.get("/v1/tenant")).json()["active_runs"] == 1
