"""The README's SDK tour is real code: it must run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its Python examples"
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:  # later blocks build on earlier ones, as a reader would
        exec(compile(block, "README.md", "exec"), namespace)
    namespace["g"].compile()  # type: ignore[attr-defined]  # the last graph is valid too
    out = capsys.readouterr().out
    assert "RunFinished" in out
    # three hits, so the branch summarised and skipped the other side
    assert re.search(r"NodeSkipped first", out)
    assert out.strip().splitlines()[-1].startswith("Answer (")
