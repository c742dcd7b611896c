"""The README's SDK tour is real code: it must run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "RunFinished" in out
    # three hits, so the branch summarised and skipped the other side
    assert re.search(r"NodeSkipped first", out)
    assert out.strip().splitlines()[-1].startswith("Answer (")
