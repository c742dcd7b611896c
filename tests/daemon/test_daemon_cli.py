"""The daemon's CLI: `tenants create|list|revoke` against Redis, and `submit`, `status`,
`logs` against a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from daemon_support import FIVE, LiveServer, make_config
from typer.testing import CliRunner

from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.cli import register

app = typer.Typer()
register(app)
runner = CliRunner()


@pytest.fixture
def live(redis_url: str) -> Iterator[LiveServer]:
    with LiveServer(create_app(make_config(redis_url), workers=1)) as server:
        yield server


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_tenants_create_list_revoke(redis_url: str) -> None:
    code, out, _err = invoke("tenants", "create", "acme", "--max-concurrent-runs", "5",
                             "--redis", redis_url)  # fmt: skip
    assert code == 0
    key = out.strip()
    assert key.startswith("trd_")
    code, _out, err = invoke("tenants", "create", "acme", "--redis", redis_url)
    assert code == 2 and "exists already" in err
    code, out2, _ = invoke("tenants", "create", "acme", "--add-key", "--redis", redis_url)
    assert code == 0 and out2.strip() != key
    code, _out, err = invoke("tenants", "create", "Bad Name", "--redis", redis_url)
    assert code == 2 and "tenant id" in err
    code, out, _ = invoke("tenants", "list", "--redis", redis_url)
    assert code == 0 and "acme" in out and out.count("active") >= 3
    key_id = key.split("_")[1]
    code, out, _ = invoke("tenants", "revoke", "acme", "--key", key_id, "--redis", redis_url)
    assert code == 0 and key_id in out
    code, out, _ = invoke("tenants", "revoke", "acme", "--redis", redis_url)
    assert code == 0 and "1 keys" in out
    code, out, _ = invoke("tenants", "list", "--redis", redis_url)
    assert "revoked" in out


def test_submit_status_and_logs(redis_url: str, live: LiveServer, tmp_path: Path) -> None:
    _code, out, _ = invoke("tenants", "create", "acme", "--redis", redis_url)
    env = {"TREADLE_URL": live.url, "TREADLE_API_KEY": out.strip()}
    flow = tmp_path / "five.yaml"
    flow.write_text(FIVE)
    code, out, err = invoke("submit", str(flow), "--input", '{"topic": "cli"}', "--wait", env=env)
    assert code == 0, err
    run = json.loads(out)
    assert run["status"] == "succeeded" and "registered five" in err
    # by name, without waiting: just the run id
    code, out, _ = invoke("submit", "five", "-i", '{"topic": "again"}', env=env)
    assert code == 0 and len(out.strip()) == 32
    code, out, _ = invoke("status", run["run_id"], env=env)
    assert code == 0 and json.loads(out)["output"] == run["output"]
    code, out, _ = invoke("logs", run["run_id"], "--json", env=env)
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["kind"] == "run_started" and events[-1]["kind"] == "run_finished"
    code, out, _ = invoke("logs", run["run_id"], "--follow", "--after", "3", env=env)
    assert code == 0 and out.splitlines()[0].split()[0] == "4"
    # errors are messages and exit codes, not tracebacks
    code, _out, err = invoke("status", "0" * 32, env=env)
    assert code == 2 and "404 not_found" in err
    code, _out, err = invoke("submit", "five", "-i", '{"topic": 1}', env=env)
    assert code == 2 and "422" in err
    code, _out, err = invoke("status", "x", env={**env, "TREADLE_API_KEY": "wrong"})
    assert code == 2 and "401" in err


def test_answer_a_waiting_run_and_read_versions(
    redis_url: str, live: LiveServer, tmp_path: Path
) -> None:
    from test_control import APPROVAL

    _code, out, _ = invoke("tenants", "create", "acme", "--redis", redis_url)
    env = {"TREADLE_URL": live.url, "TREADLE_API_KEY": out.strip()}
    flow = tmp_path / "approval.yaml"
    flow.write_text(APPROVAL)
    code, out, err = invoke("submit", str(flow), "-i", '{"cmd": "ls"}', "--wait", env=env)
    assert code == 3 and "treadle answer" in err, err
    run = json.loads(out)
    assert run["status"] == "waiting" and run["pending_inputs"][0]["node"] == "approve"
    code, out, err = invoke("answer", run["run_id"], "--input", '{"approved": true}',
                            "--idempotency-key", "k", env=env)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["node"] == "approve"
    code, _out, err = invoke("answer", run["run_id"], "--input", '{"nope": 1}', env=env)
    assert code == 2 and "409 conflict" in err
    flow.write_text(APPROVAL.replace("Plan {cmd}", "Plan carefully {cmd}"))
    assert invoke("submit", str(flow), "-i", '{"cmd": "ls"}', env=env)[0] == 0
    code, out, _ = invoke("workflows", "versions", "approval", env=env)
    assert code == 0 and "1" in out and "2" in out
    code, out, _ = invoke("workflows", "show", "approval", "--version", "1", env=env)
    assert code == 0 and "Plan {cmd}" in out and "carefully" not in out
    code, out, _ = invoke("workflows", "list", env=env)
    assert code == 0 and "approval" in out


def test_models_file_is_yaml_or_json_and_errors_name_file_line_column(tmp_path: Path) -> None:
    from treadle.runtime.daemon.cli import _models

    good = tmp_path / "models.yaml"
    good.write_text("# offered to every workflow\nfast: {backend: scripted, latency_s: 0}\n")
    assert _models(good) == {"fast": {"backend": "scripted", "latency_s": 0}}
    as_json = tmp_path / "models.json"
    as_json.write_text('{"fast": {"backend": "sim"}}')
    assert _models(as_json) == {"fast": {"backend": "sim"}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("fast: {backend: scripted\nslow: 1\n")
    code, _out, err = invoke("serve", "--models", str(bad))
    assert code == 2
    assert err.startswith(f"{bad}:1:7: --models: '{{' is not closed"), err
    flat = tmp_path / "flat.yaml"
    flat.write_text("- not a mapping\n")
    code, _out, err = invoke("serve", "--models", str(flat))
    assert code == 2 and "expected a mapping of alias -> backend config" in " ".join(err.split())
