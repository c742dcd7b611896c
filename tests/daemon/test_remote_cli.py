"""`treadle remote ...` against a real daemon (uvicorn, one worker) on the private Redis:
submit, runs, get, logs --follow, cancel, resume with input, workflows and versions, each
with --json; runs named by full ids and unique prefixes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from daemon_support import FIVE, LiveServer, make_config, slow_workflow
from test_control import APPROVAL
from typer.testing import CliRunner

from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.cli import register
from treadle.runtime.daemon.remote import app

runner = CliRunner()


@pytest.fixture
def env(redis_url: str) -> Iterator[dict[str, str]]:

    admin = typer.Typer()
    register(admin)
    with LiveServer(create_app(make_config(redis_url), workers=1)) as server:
        made = runner.invoke(admin, ["tenants", "create", "acme", "--redis", redis_url])
        assert made.exit_code == 0, made.stderr
        yield {"TREADLE_URL": server.url, "TREADLE_API_KEY": made.stdout.strip()}


def remote(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def remote_json(env: dict[str, str], *args: str) -> dict[str, object]:
    code, out, err = remote(env, *args, "--json")
    assert code == 0, err
    value: dict[str, object] = json.loads(out)
    return value


def wait_for_status(env: dict[str, str], run_id: str, wanted: set[str]) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while True:
        run = remote_json(env, "get", run_id)
        if run["status"] in wanted or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def test_submit_list_get_and_follow_by_prefix(env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "five.yaml"
    flow.write_text(FIVE)
    run = remote_json(env, "submit", str(flow), "-i", '{"topic": "remote"}', "--wait")
    run_id = str(run["run_id"])
    assert run["status"] == "succeeded" and len(run_id) == 32
    code, out, err = remote(env, "submit", "five", "-i", '{"topic": "again"}')
    assert code == 0 and len(out.strip()) == 32, err
    # a prefix only this run has: the shortest that no other of the tenant's runs starts
    other = out.strip()
    prefix = next(run_id[:n] for n in range(1, 33) if not other.startswith(run_id[:n]))
    got = remote_json(env, "get", prefix)
    assert got["run_id"] == run_id and got["output"] == run["output"]
    code, out, _ = remote(env, "get", prefix)
    assert code == 0 and f"run       {run_id}" in out and "succeeded" in out
    listed = remote_json(env, "runs", "--prefix", prefix)
    assert [r["run_id"] for r in listed["runs"]] == [run_id]  # type: ignore[index]
    code, out, _ = remote(env, "runs", "--status", "succeeded")
    assert code == 0 and run_id in out
    # logs --follow with a prefix: every event, each a JSON line, to the end
    code, out, err = remote(env, "logs", prefix, "--follow", "--json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["kind"] == "run_started" and events[-1]["kind"] == "run_finished"
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
    code, out, _ = remote(env, "logs", run_id)
    assert code == 0 and "run_finished" in out.splitlines()[-1]


def test_ambiguous_and_unknown_prefixes_are_clear_errors(env: dict[str, str]) -> None:
    code, _out, err = remote(env, "submit", "five")
    assert code == 2 and "404" in err  # not registered: one line, no traceback
    ids: list[str] = []
    headers = {"Authorization": f"Bearer {env['TREADLE_API_KEY']}"}
    with httpx.Client(base_url=env["TREADLE_URL"], headers=headers) as c:
        assert c.post("/v1/workflows", json={"definition": FIVE}).status_code == 201
        while len({i[0] for i in ids}) == len(ids):  # until two ids share a first digit
            resp = c.post("/v1/runs", json={"workflow": "five", "inputs": {"topic": "x"}})
            ids.append(resp.json()["run_id"])
    shared = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    code, _out, err = remote(env, "get", shared)
    assert code == 2 and "starts several run ids" in err
    code, _out, err = remote(env, "get", "zz")
    assert code == 2 and "no run's id starts with 'zz'" in err


def test_resume_cancel_workflows_and_versions(env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "approval.yaml"
    flow.write_text(APPROVAL)
    code, out, err = remote(env, "submit", str(flow), "-i", '{"cmd": "ls"}', "--wait")
    assert code == 3, err  # waiting for input
    assert "waiting   approve: Run ls?" in out
    run_id = out.split("run       ", 1)[1].split()[0]
    answered = remote_json(env, "resume", run_id[:12], "-i", '{"approved": true}',
                           "--idempotency-key", "k1")  # fmt: skip
    assert answered["node"] == "approve" and answered["replayed"] is False
    final = wait_for_status(env, run_id, {"succeeded", "failed"})
    assert final["status"] == "succeeded"
    assert final["output"]["approved"] is True  # type: ignore[index]
    code, _out, err = remote(env, "resume", run_id, "-i", '{"approved": false}')
    assert code == 2 and "409" in err
    # a second version; both listed, oldest first
    flow.write_text(APPROVAL.replace("Plan {cmd}", "Plan carefully {cmd}"))
    assert remote(env, "submit", str(flow), "-i", '{"cmd": "ls"}')[0] == 0
    versions = remote_json(env, "versions", "approval")["versions"]
    assert [v["version"] for v in versions] == [1, 2]  # type: ignore[attr-defined]
    code, out, _ = remote(env, "versions", "approval")
    assert code == 0 and "Plan" not in out and "approve" in out
    code, out, _ = remote(env, "show", "approval", "--version", "1")
    assert code == 0 and "Plan {cmd}" in out and "carefully" not in out
    code, out, _ = remote(env, "show", "approval")
    assert code == 0 and "Plan carefully {cmd}" in out
    found = remote_json(env, "workflows")["workflows"]
    assert [(w["name"], w["version"]) for w in found] == [("approval", 2)]  # type: ignore[attr-defined]
    # cancel a slow run by prefix
    slow = tmp_path / "slow.yaml"
    slow.write_text(slow_workflow(latency_s=0.3, steps=8))
    code, out, _ = remote(env, "submit", str(slow), "-i", '{"topic": "t"}')
    slow_id = out.strip()
    cancelled = remote_json(env, "cancel", slow_id[:10])
    assert cancelled["run_id"] == slow_id and cancelled["cancel_requested"] is True
    assert wait_for_status(env, slow_id, {"cancelled"})["status"] == "cancelled"
    code, _out, err = remote(env, "cancel", slow_id)
    assert code == 2 and "409" in err


def test_refusals_are_one_line_with_the_status(env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "five.yaml"
    flow.write_text(FIVE)
    assert remote(env, "submit", str(flow), "-i", '{"topic": "x"}')[0] == 0
    code, _out, err = remote(env, "submit", "five", "-i", '{"topic": 1}')
    assert code == 2 and err.startswith("error: 422 ") and "topic" in err and "Traceback" not in err
    code, _out, err = remote(env, "submit", "five", "-i", "[1]")
    assert code == 2 and "--input must be a JSON object" in err
    code, _out, err = remote({**env, "TREADLE_API_KEY": "trd_wrong"}, "runs")
    assert code == 2 and err.startswith("error: 401 ")
    code, _out, err = remote(env, "show", "nope")
    assert code == 2 and err.startswith("error: 404 ")
