"""What a user sees when something is wrong: one clear line per problem, no traceback, and
nothing left behind (issue 14). Run as a user runs it: a subprocess of `python -m treadle`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from cli_support import piped, treadle


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An empty treadle home (its runs.db) for the commands of one test."""
    return {"TREADLE_HOME": str(tmp_path / "home")}


def test_a_bad_model_entry_is_refused_before_the_run_exists(
    tmp_path: Path, home: dict[str, str]
) -> None:
    """14.6: `validate` reports it; `run` says the same in one line and records no run."""
    flow = write(
        tmp_path,
        "flow.yaml",
        """\
        name: m
        models:
          default:
            backend: pool
            replicas: ["http://localhost:8000/v1", "http://localhost:8001/v1"]
        nodes:
          - {id: a, kind: llm, prompt: hi}
        """,
    )
    expected = f"{flow}:5:15: field 'models.default.replicas': replica 0 is "
    checked = treadle("validate", str(flow), env=home)
    assert checked.returncode == 1 and expected in checked.stderr
    ran = treadle("run", str(flow), env=home)
    assert ran.returncode == 2 and expected in ran.stderr
    assert "Traceback" not in ran.stderr
    listed = treadle("runs", env=home)
    assert "running" not in listed.stdout


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "import no_such_package_x\n",
            "{file}:1: the program failed to import: ModuleNotFoundError: ",
        ),
        (
            "x = 1\ndef (:\n",
            "{file}:2:5: the program failed to import: SyntaxError: invalid syntax",
        ),
        (
            "\n\nraise RuntimeError('boom')\n",
            "{file}:3: the program failed to import: RuntimeError: boom",
        ),
    ],
)
def test_a_program_that_fails_to_import_is_one_line(
    tmp_path: Path, source: str, expected: str
) -> None:
    """14.7: `treadle run bad.py:graph` names the file, line and error; no traceback."""
    program = write(tmp_path, "bad.py", source)
    out = treadle("validate", f"{program}:graph")
    assert out.returncode == 2
    assert out.stderr.startswith(expected.format(file=program)), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1


def test_a_module_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, "broken_mod.py", "raise ValueError('bad config')\n")
    out = treadle("validate", "broken_mod:graph", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cannot import 'broken_mod'" in out.stderr and "ValueError: bad config" in out.stderr


def test_errors_are_one_unwrapped_line_each_and_never_markup(tmp_path: Path) -> None:
    """14.9: brackets survive (`nodes[second]`), a long path is not wrapped, one problem is
    one `FILE:LINE:COL: message` line that editors and CI annotators can parse."""
    deep = tmp_path / ("a_rather_long_directory_name_" * 3) / "and_another_level_of_folders"
    deep.mkdir(parents=True)
    flow = write(
        deep,
        "workflow_with_a_long_name.yaml",
        """\
        name: x
        nodes:
          - id: a
            kind: llm
            prompt: hi
          - id: second
            kind: tool
            tol: x
        """,
    )
    out = piped("validate", str(flow))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"{flow}:8:5: nodes[second].tol: unknown field 'tol' (did you mean 'tool'?)"
    ]
    # every problem of a graph: one line each, the position first
    graph = write(
        deep,
        "two_problems.yaml",
        """\
        name: x
        inputs: {q: str}
        nodes:
          - {id: a, kind: llm, model: nowhere, prompt: "[b] {q}", inputs: {q: $input.q}}
          - {id: b, kind: llm, prompt: "[c] {x}", inputs: {x: $nope}}
        """,
    )
    out = piped("validate", str(graph))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[:2] == [
        f"{graph}:4:31: node 'a', field 'model': unknown model alias 'nowhere' (known: default)",
        f"{graph}:5:55: node 'b', field 'inputs.x': reference to unknown node 'nope'",
    ]
    assert lines[2:] == ["error: graph 'x' is invalid (2 problems)"]


def test_an_input_file_that_is_not_valid_yaml_says_so(tmp_path: Path) -> None:
    """14.9: `--input @file.yaml` parses YAML and says where it is wrong, not 'not JSON'."""
    inputs = write(tmp_path, "in.yaml", "question: [unclosed\n")
    out = piped("run", "--store", "memory", "examples/research.yaml", "--input", f"@{inputs}")
    assert out.returncode == 2 and "JSON" not in out.stderr
    assert f"{inputs}:" in out.stderr and len(out.stderr.splitlines()) == 1
