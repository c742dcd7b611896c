"""The documentation is real (14.16): every complete workflow in docs/workflow-files.md
loads and compiles next to the `helpers.py` the page shows, and the README links the
pages that document workflow files and the daemon's API."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from treadle import Runtime
from treadle.graphs.files.loader import load_workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ROOT / "docs" / "workflow-files.md"


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_every_workflow_on_the_page_loads_and_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = WORKFLOW_FILES.read_text()
    (helpers,) = [b for b in blocks(text, "python") if b.startswith('"""helpers.py')]
    (tmp_path / "helpers.py").write_text(helpers)
    monkeypatch.delitem(sys.modules, "helpers", raising=False)
    workflows = [b for b in blocks(text, "yaml") if b.startswith("name:")]
    assert len(workflows) >= 5
    kinds: set[str] = set()
    for i, workflow in enumerate(workflows):
        path = tmp_path / f"flow{i}.yaml"
        path.write_text(workflow)
        spec = load_workflow(path)  # `helpers:...` is found next to the file
        cg = Runtime().compile(spec)  # models: entries are checked too
        kinds |= {n.kind for n in cg.nodes.values()}
    assert kinds >= {"llm", "func", "tool", "branch", "map", "subgraph", "planner"}
    for key in ("base_url", "dialect", "replicas", "route:", "fn:", "tools:", "sys.path"):
        assert key in text, key


def test_the_readme_links_the_reference_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/workflow-files.md", "docs/daemon-api.md"):
        assert f"({page})" in readme, page
        assert (ROOT / page).is_file(), page
