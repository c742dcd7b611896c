"""Every example runs offline on the defaults, and each workflow file is the same program
as its Python module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from treadle import Runtime, load_workflow
from treadle.examples import (
    approval,
    doc_digest,
    fix_until_green,
    race_prompts,
    research,
    text_to_sql,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIRS = [
    ("research", research),
    ("text_to_sql", text_to_sql),
    ("doc_digest", doc_digest),
    ("approval", approval),
    ("fix_until_green", fix_until_green),
    ("race_prompts", race_prompts),
]


@pytest.mark.parametrize(("name", "module"), PAIRS)
def test_workflow_file_is_the_same_program_as_the_sdk(name: str, module: object) -> None:
    assert load_workflow(str(EXAMPLES / f"{name}.yaml")) == module.graph.spec  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_research_example() -> None:
    result = await Runtime().run(load_workflow(str(EXAMPLES / "research.yaml")))
    report = result.output.report
    assert "kv-eviction.md" in report.sources and "prefix-caching.md" in report.sources
    assert report.summary.startswith("How do serving engines make LLM agents fast?")


@pytest.mark.anyio
async def test_text_to_sql_example_repairs_the_bad_draft(tmp_path: Path) -> None:
    from treadle.runtime.core.events import NodeSkipped

    result = await Runtime().run(text_to_sql.graph, {"database": str(tmp_path / "shop.db")})
    assert result.output.answer.answer.startswith("country=US, revenue=1114.0")
    skipped = {e.node for e in result.events if isinstance(e, NodeSkipped)}
    assert skipped == {"execute"}  # the draft was invalid, so the repaired path ran


@pytest.mark.anyio
async def test_doc_digest_example() -> None:
    result = await Runtime().run(load_workflow(str(EXAMPLES / "doc_digest.yaml")))
    digest = result.output.digest
    assert digest.documents == 3
    assert digest.follow_ups[0] == "separate pool for reports"


def test_cli_runs_an_example_as_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "treadle",
            "run",
            str(EXAMPLES / "research.yaml"),
            "--json",
            "--db",
            str(tmp_path / "runs.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["status"] == "succeeded"
    assert payload["output"]["report"]["sources"]


@pytest.mark.anyio
async def test_approval_example_waits_and_deletes_only_when_approved(tmp_path: Path) -> None:
    runtime = Runtime()
    refused_ws = str(_workspace(tmp_path / "refused"))
    waiting = await runtime.run(load_workflow(str(EXAMPLES / "approval.yaml")),
                                {"workspace": refused_ws})  # fmt: skip
    assert waiting.status == "waiting"
    assert waiting.pending[0].prompt.startswith('Delete ["build/app.o", "build/app.bin"')
    refused = await runtime.resume(waiting.run_id, approval.graph, {"approved": False})
    assert refused.output.deleted == [] and (Path(refused_ws) / "build" / "app.o").exists()
    approved_ws = str(_workspace(tmp_path / "approved"))
    waiting = await runtime.run(approval.graph, {"workspace": approved_ws})
    done = await runtime.resume(waiting.run_id, approval.graph, {"approved": True})
    assert done.output.deleted == ["build/app.o", "build/app.bin", "logs/old.log"]
    left = sorted(str(p.relative_to(approved_ws)) for p in Path(approved_ws).rglob("*.*"))
    assert left == ["src/app.c"]


def _workspace(root: Path) -> Path:
    for name, text in approval.FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.anyio
async def test_fix_until_green_example_loops_until_the_tests_pass() -> None:
    result = await Runtime().run(load_workflow(str(EXAMPLES / "fix_until_green.yaml")))
    assert result.output.passed and "re.findall" in result.output.code
    from treadle.runtime.core.events import NodeFinished

    attempts = [e.node for e in result.events if isinstance(e, NodeFinished) and "/" not in e.node]
    assert attempts == ["fix[0]", "fix[1]", "fix"]  # the draft failed, its fix passed


@pytest.mark.anyio
async def test_race_prompts_example_takes_the_first_answer() -> None:
    result = await Runtime().run(load_workflow(str(EXAMPLES / "race_prompts.yaml")))
    assert result.output.winner == "quick"
    assert result.output.answer == "Keep the KV cache of idle agents pinned."


def test_cli_waits_for_approval_and_resumes_with_the_answer(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    base = [sys.executable, "-m", "treadle"]
    ws = str(_workspace(tmp_path / "ws"))
    first = subprocess.run(
        [*base, "run", str(EXAMPLES / "approval.yaml"), "--json", "--db", db,
         "--input", json.dumps({"workspace": ws})],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert first.returncode == 3, first.stderr
    payload = json.loads(first.stdout)
    assert payload["status"] == "waiting"
    assert payload["pending_inputs"][0]["answer_schema"]["required"] == ["approved"]
    resume = [*base, "resume", payload["run_id"], "--json", "--db", db]
    bad = subprocess.run([*resume, "--input", '{"approve": true}'], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "approved: Field required" in bad.stderr
    done = subprocess.run([*resume, "--input", '{"approved": true}'], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"]["deleted"] == [
        "build/app.o", "build/app.bin", "logs/old.log",
    ]  # fmt: skip
