"""Every example runs offline on the defaults, and each workflow file is the same program
as its Python module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from treadle import Runtime, load_workflow
from treadle.examples import doc_digest, research, text_to_sql

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIRS = [("research", research), ("text_to_sql", text_to_sql), ("doc_digest", doc_digest)]


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
