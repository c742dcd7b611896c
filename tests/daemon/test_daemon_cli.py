"""The daemon's CLI: `tenants create|list|revoke` against Redis, and `serve`'s options
(the client commands, `treadle remote ...`, are in test_remote_cli.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from daemon_support import LiveServer, make_config
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
