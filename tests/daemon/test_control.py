"""The daemon and the control-flow features: versioned workflows (each registration of a
changed definition is a new immutable version; runs keep theirs; a run may pin one), and
human input over the API (`pending_inputs`, `POST /v1/runs/{id}/input`: checked,
idempotent on its key, tenant-scoped; a waiting run holds no quota slot; a deadline
resumes it with its default)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from daemon_support import FIVE, Daemon, error_of, make_config, open_daemon, slow_workflow

pytestmark = pytest.mark.anyio

APPROVAL = """\
name: approval
inputs:
  cmd: str
types:
  Approval: {approved: bool, note: {type: str, default: ""}}
models:
  default: {backend: scripted, latency_s: 0.0}
nodes:
  - {id: plan, kind: llm, prompt: "Plan {cmd}", inputs: {cmd: $input.cmd}}
  - id: approve
    kind: ask
    prompt: "Run {cmd}? Plan: {plan}"
    output: Approval
    inputs: {cmd: $input.cmd, plan: $plan}
  - {id: act, kind: llm, prompt: "Act on {a}", inputs: {a: $approve.approved}}
outputs:
  approved: $approve.approved
  result: $act
"""


async def wait_status(
    daemon: Daemon, key: str, run_id: str, wanted: set[str], timeout_s: float = 20.0
) -> dict[str, Any]:
    async with daemon.client(key) as c:
        with anyio.fail_after(timeout_s):
            while True:
                body: dict[str, Any] = (await c.get(f"/v1/runs/{run_id}")).json()
                if body["status"] in wanted:
                    return body
                await anyio.sleep(0.02)


async def test_workflow_versions_are_immutable_and_runs_keep_or_pin_theirs(
    api_only: Daemon,
) -> None:
    key = await api_only.tenant("acme")
    assert (await api_only.register(key))["version"] == 1
    assert (await api_only.register(key))["version"] == 1  # the same definition again
    v2 = FIVE.replace("Outline {topic}", "Plan {topic}")
    assert (await api_only.register(key, v2))["version"] == 2
    async with api_only.client(key) as c:
        versions = (await c.get("/v1/workflows/five/versions")).json()["versions"]
        assert [v["version"] for v in versions] == [1, 2]
        one = (await c.get("/v1/workflows/five/versions/1")).json()
        assert "Outline {topic}" in one["definition"] and one["digest"] == versions[0]["digest"]
        assert error_of(await c.get("/v1/workflows/five/versions/3"))[:2] == (404, "not_found")
        latest = await c.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "x"}})
        pinned = await c.post(
            "/v1/runs", json={"workflow": "five", "inputs": {"topic": "x"}, "version": 1}
        )
        assert latest.json()["workflow_version"] == 2 and pinned.json()["workflow_version"] == 1
        missing = await c.post(
            "/v1/runs", json={"workflow": "five", "inputs": {"topic": "x"}, "version": 9}
        )
        assert error_of(missing)[:2] == (404, "not_found")
        assert "version 9" in error_of(missing)[2]
    # a run keeps the program of its version, whatever is registered later
    record = await api_only.services.store.get_run(pinned.json()["run_id"])
    assert record is not None
    program = await api_only.services.registry.compiled(record.source.split(":", 1)[1])
    assert program.spec.node("outline").prompt == "Outline {topic}"  # type: ignore[attr-defined]


async def test_a_waiting_run_is_answered_over_the_api(daemon: Daemon) -> None:
    key = await daemon.tenant("acme", max_concurrent_runs=1)
    await daemon.register(key, APPROVAL)
    await daemon.register(key, slow_workflow(latency_s=0.1, steps=6))
    async with daemon.client(key) as c:
        body = {"workflow": "approval", "inputs": {"cmd": "rm -rf /tmp/x"}}
        run = (await c.post("/v1/runs", json=body)).json()
        waiting = await wait_status(daemon, key, run["run_id"], {"waiting"})
        [request] = waiting["pending_inputs"]
        assert request["node"] == "approve" and request["prompt"].startswith("Run rm -rf /tmp/x?")
        assert request["answer_schema"]["required"] == ["approved"]
        # the request is in the run's event stream too
        events = (await c.get(f"/v1/runs/{run['run_id']}/events", params={"follow": False})).text
        assert "event: input_requested" in events and "event: run_waiting" in events
        # a waiting run holds no slot (its worker releases it, in its next batch): another
        # run of the tenant (limit 1) is admitted ...
        with anyio.fail_after(10):
            while (await c.get("/v1/tenant")).json()["active_runs"]:
                await anyio.sleep(0.02)
        other = await c.post("/v1/runs", json={"workflow": "slow", "inputs": {"topic": "t"}})
        assert other.status_code == 201, other.text
        # ... and while that one runs, answering is refused (it would need the slot)
        busy = await c.post(f"/v1/runs/{run['run_id']}/input", json={"value": {"approved": 1}})
        assert error_of(busy)[0] == 429 and busy.headers["Retry-After"]
        await wait_status(daemon, key, other.json()["run_id"], {"succeeded"})
        with anyio.fail_after(10):  # its slot is released in the worker's next batch
            while (await c.get("/v1/tenant")).json()["active_runs"]:
                await anyio.sleep(0.02)
        # a wrong answer is refused and nothing is recorded
        bad = await c.post(f"/v1/runs/{run['run_id']}/input", json={"value": {"note": "?"}})
        assert error_of(bad)[0] == 422 and "approved" in error_of(bad)[2]
        url = f"/v1/runs/{run['run_id']}/input"
        body = {"value": {"approved": True}, "key": "form-1"}
        first = await c.post(url, json=body)
        assert first.status_code == 202, first.text
        assert first.json()["node"] == "approve" and first.json()["replayed"] is False
        again = await c.post(url, json=body)  # a retry after a lost reply
        assert again.status_code == 202 and again.json()["replayed"] is True
        other_key = await c.post(url, json={"value": {"approved": False}, "node": "approve",
                                            "key": "form-2"})  # fmt: skip
        assert error_of(other_key)[:2] == (409, "conflict")
    done = await wait_status(daemon, key, run["run_id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["output"]["approved"] is True
    assert done["pending_inputs"] == []
    # each node ran once: the plan before the wait was not repeated after it
    journal = await daemon.services.store.read_events(run["run_id"])
    finished = [e.node for e in journal if e.kind == "node_finished"]  # type: ignore[attr-defined]
    assert sorted(finished) == ["act", "approve", "plan"]
    async with daemon.client(key) as c:
        late = await c.post(f"/v1/runs/{run['run_id']}/input", json={"value": {"approved": 1}})
        assert error_of(late)[:2] == (409, "conflict")


async def test_a_deadline_resumes_a_waiting_run_with_its_default(daemon: Daemon) -> None:
    key = await daemon.tenant("acme")
    deadline = "    deadline_s: 0.2\n    default: {approved: false, note: timeout}\n"
    await daemon.register(
        key, APPROVAL.replace("    output: Approval\n", "    output: Approval\n" + deadline)
    )
    async with daemon.client(key) as c:
        body = {"workflow": "approval", "inputs": {"cmd": "deploy"}}
        run = (await c.post("/v1/runs", json=body)).json()
    done = await wait_status(daemon, key, run["run_id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["output"]["approved"] is False
    journal = await daemon.services.store.read_events(run["run_id"])
    kinds = [e.kind for e in journal]
    assert "run_waiting" in kinds  # it parked first, then the deadline queued it again
    received = [e for e in journal if e.kind == "input_received"]
    assert [e.defaulted for e in received] == [True]  # type: ignore[attr-defined]


async def test_the_api_loads_no_definition_to_answer_or_draw_a_run(
    api_only: Daemon, redis_url: str
) -> None:
    """Answering a run's request and drawing its page need the run's definition: the API
    asks its definition checker's process, and never loads a definition on its own loop
    (a tenant's large definition would stall every tenant's requests there)."""
    key = await api_only.tenant("acme")
    await api_only.register(key, APPROVAL)
    registry = api_only.services.registry
    async for workers in open_daemon(make_config(redis_url), workers=1):  # their own registry
        assert workers.services.registry is not registry
        async with api_only.client(key) as c:
            body = {"workflow": "approval", "inputs": {"cmd": "deploy"}}
            run = (await c.post("/v1/runs", json=body)).json()
            await wait_status(api_only, key, run["run_id"], {"waiting"})
            bad = await c.post(f"/v1/runs/{run['run_id']}/input", json={"value": {"x": 1}})
            assert error_of(bad)[0] == 422 and "approved" in error_of(bad)[2]
            url = f"/v1/runs/{run['run_id']}/input"
            answered = await c.post(url, json={"value": {"approved": True}})
            assert answered.status_code == 202, answered.text
            login = await c.post("/ui/login", data={"key": key, "next": "/ui/"})
            assert login.status_code == 303
            state = await c.get(f"/ui/api/runs/{run['run_id']}/state")
            assert state.status_code == 200, state.text
            assert [n["id"] for n in state.json()["nodes"]] == ["plan", "approve", "act"]
            page = await c.get(f"/ui/runs/{run['run_id']}")
            assert page.status_code == 200 and "<svg" in page.text
        done = await wait_status(api_only, key, run["run_id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded"
    assert registry._cache == {}  # nothing compiled in the API's process
