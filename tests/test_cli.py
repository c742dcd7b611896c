"""The command line, run as a user runs it: a subprocess of `python -m treadle`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_support import piped, treadle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_validate_ok_and_errors_with_file_line_column(tmp_path: Path) -> None:
    ok = treadle("validate", str(EXAMPLES / "text_to_sql.yaml"))
    assert ok.returncode == 0 and "ok text_to_sql: 8 nodes" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            name: bad
            inputs: {q: str}
            nodes:
              - id: a
                kind: llm
                model: nowhere
                prompt: "Answer {q}"
                inputs: {q: $input.q}
            """
        )
    )
    out = treadle("validate", str(bad))
    assert out.returncode == 1
    assert f"{bad}:6:" in out.stderr and "unknown model alias 'nowhere'" in out.stderr


def test_graph_renders_mermaid_and_dot() -> None:
    mermaid = treadle("graph", str(EXAMPLES / "research.yaml"))
    assert mermaid.returncode == 0 and mermaid.stdout.startswith("flowchart TD")
    dot = treadle("graph", str(EXAMPLES / "research.yaml"), "--format", "dot")
    assert dot.stdout.startswith('digraph "research"')


def test_schema_is_json_schema() -> None:
    out = treadle("schema")
    schema = json.loads(out.stdout)
    assert schema["title"] == "treadle workflow" and "properties" in schema


def test_run_with_input_and_bad_input(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    good = treadle(
        "run",
        str(EXAMPLES / "research.yaml"),
        "--json",
        "--db",
        db,
        "--input",
        '{"question": "What is prefix caching?"}',
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["output"]["report"]["summary"].startswith("What is prefix")
    bad = treadle("run", str(EXAMPLES / "research.yaml"), "--db", db, "--input", '{"question": 3')
    assert bad.returncode == 2 and "--input is not valid JSON" in bad.stderr
    wrong = treadle("run", str(EXAMPLES / "research.yaml"), "--db", db, "--input", '{"q": 1}')
    assert wrong.returncode == 2 and "q: Extra inputs are not permitted" in wrong.stderr
    listed = treadle("runs", "--db", db)
    assert "research" in listed.stdout and "succeeded" in listed.stdout


def test_input_from_a_yaml_file_and_its_syntax_errors(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    good = tmp_path / "in.yaml"
    good.write_text("# the question\nquestion: What is prefix caching?\n")
    ran = treadle("run", str(EXAMPLES / "research.yaml"), "--json", "--db", db, "-i", f"@{good}")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["output"]["report"]["summary"].startswith("What is prefix")
    bad = tmp_path / "bad.yaml"
    bad.write_text("question: fine\n  nested: [oops\n")
    refused = treadle("run", str(EXAMPLES / "research.yaml"), "--db", db, "-i", f"@{bad}")
    assert refused.returncode == 2
    # one line naming the file, the line and column, the option, and the problem
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"{bad}:2:9: --input: ") and "not allowed here" in line, line


PROGRAM = """
import os, time
from pathlib import Path
from treadle import Graph

LOG = Path(os.environ["TREADLE_TEST_LOG"])

def step(name, x, slow=0.0, fail_once=False):
    with LOG.open("a") as f:
        f.write(name + "\\n")
    if fail_once and not (LOG.parent / "fixed").exists():
        raise RuntimeError("not yet")
    time.sleep(slow)
    return x + 1

def a(x: int) -> int: return step("a", x)
def b(x: int) -> int: return step("b", x, slow=float(os.environ.get("SLOW", "0")))
def c(x: int) -> int: return step("c", x, fail_once=True)

graph = Graph("resumable", inputs={"x": int})
na = graph.func("a", a, inputs={"x": graph.input.x})
nb = graph.func("b", b, inputs={"x": na}, blocking=True)
graph.output(out=graph.func("c", c, inputs={"x": nb}).out)
"""


def _program(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM)
    env = {**os.environ, "TREADLE_TEST_LOG": str(tmp_path / "log.txt"), "COLUMNS": "200"}
    return path, env


def _log(tmp_path: Path) -> list[str]:
    return (tmp_path / "log.txt").read_text().split()


def test_resume_after_failure_does_not_repeat_finished_nodes(tmp_path: Path) -> None:
    prog, env = _program(tmp_path)
    db = str(tmp_path / "runs.db")
    base = [sys.executable, "-m", "treadle", "run", "--db", db, "--json"]
    first = subprocess.run(
        [*base, f"{prog}:graph", "--input", '{"x": 1}'],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert first.returncode == 1
    run_id = json.loads(first.stdout)["run_id"]
    (tmp_path / "fixed").write_text("")
    second = subprocess.run(  # 14.10: a unique prefix of the id is enough
        [*base, "--resume", run_id[:8]], capture_output=True, text=True, env=env, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["output"] == {"out": 4}
    assert _log(tmp_path) == ["a", "b", "c", "c"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_resume_after_interrupt_or_kill(tmp_path: Path, sig: signal.Signals) -> None:
    prog, env = _program(tmp_path)
    (tmp_path / "fixed").write_text("")
    env["SLOW"] = "30"
    db = str(tmp_path / "runs.db")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "treadle",
            "run",
            "--db",
            db,
            f"{prog}:graph",
            "--input",
            '{"x": 1}',
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "log.txt").exists() or "b" not in _log(tmp_path):
        assert time.monotonic() < deadline, "node b never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    listed = treadle("runs", "--db", db)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "resume with" in err
        assert "interrupted" in listed.stdout and "cancelled" not in listed.stdout
    (record,) = json.loads(treadle("runs", "--db", db, "--json").stdout)
    run_id = record["run_id"]
    env["SLOW"] = "0"
    resumed = subprocess.run(
        [sys.executable, "-m", "treadle", "run", "--db", db, "--json", "--resume", run_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["output"] == {"out": 4}
    # a finished before the interruption and is not repeated; b was running and runs again
    assert _log(tmp_path) == ["a", "b", "b", "c"]


def test_graph_of_a_run_draws_the_planner_tasks(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    ran = treadle("run", "treadle.examples.planner_math:graph", "--json", "--db", db)
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["run_id"]
    drawn = treadle("graph", "treadle.examples.planner_math:graph", "--run", run_id, "--db", db)
    assert drawn.returncode == 0, drawn.stderr
    assert 'value_task1["task1: read_file"]' in drawn.stdout
    # the calculator task that combines the two reads depends on both
    assert "value_task3 -.-> value_task5" in drawn.stdout
    assert "value_task4 -.-> value_task5" in drawn.stdout
    dot = treadle(
        "graph", "treadle.examples.planner_math:graph", "--run", run_id, "--db", db, "-f", "dot"
    )
    assert 'subgraph "cluster_value"' in dot.stdout


# -- 14.10: the first hour with the command line -------------------------------------------


def test_version() -> None:
    from importlib.metadata import version

    out = treadle("--version")
    assert out.returncode == 0 and out.stdout == f"treadle {version('treadle')}\n"


def test_runs_shows_full_ids_lists_as_json_and_refuses_a_bad_status(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    ids = [
        json.loads(treadle("run", str(EXAMPLES / "research.yaml"), "--json", "--db", db).stdout)[
            "run_id"
        ]
        for _ in range(2)
    ]
    table = piped("runs", "--db", db)
    assert all(run_id in table.stdout for run_id in ids), table.stdout
    listed = json.loads(treadle("runs", "--db", db, "--json").stdout)
    assert [r["run_id"] for r in listed] == ids[::-1]  # newest first
    assert {r["status"] for r in listed} == {"succeeded"} and listed[0]["graph"] == "research"
    bogus = treadle("runs", "--db", db, "--status", "bogus")
    assert bogus.returncode == 2
    assert bogus.stderr.strip() == (
        "error: --status must be one of pending, running, waiting, interrupted, succeeded, "
        "failed, cancelled; not 'bogus'"
    )


def test_trace_finds_a_run_by_a_unique_prefix(tmp_path: Path) -> None:
    import anyio

    from treadle.runtime.core.store import RunRecord
    from treadle.runtime.stores.sqlite import SqliteStore

    db = tmp_path / "runs.db"
    ran = treadle("run", str(EXAMPLES / "research.yaml"), "--json", "--db", str(db))
    run_id = json.loads(ran.stdout)["run_id"]
    traced = treadle("trace", run_id[:6], "--db", str(db), "--json")
    assert traced.returncode == 0, traced.stderr
    assert json.loads(traced.stdout)["run_id"] == run_id

    async def two_alike() -> None:
        store = SqliteStore(db)
        for suffix in ("1", "2"):
            await store.create_run(RunRecord(run_id="abc" + suffix, graph="g"))
        await store.close()

    anyio.run(two_alike)
    ambiguous = treadle("trace", "abc", "--db", str(db))
    assert ambiguous.returncode == 2
    assert ambiguous.stderr.strip() == (
        "error: 'abc' is the start of more than one run id (abc1, abc2): give more of it"
    )
    missing = treadle("trace", "zzz", "--db", str(db))
    assert missing.returncode == 2 and "no run 'zzz' in the store" in missing.stderr


ONE_TOOL = """
from treadle import Graph, tool

@tool
def double(x: int) -> int:
    \"\"\"Double it.\"\"\"
    return 2 * x

graph = Graph("one", inputs={"x": int})
graph.output(out=graph.tool("t", double, inputs={"x": graph.input.x}).out)
"""


def test_counts_are_singular_when_they_are_one(tmp_path: Path) -> None:
    prog = tmp_path / "one.py"
    prog.write_text(ONE_TOOL)
    out = treadle("run", "--store", "memory", f"{prog}:graph", "--input", '{"x": 2}')
    assert out.returncode == 0, out.stderr
    assert "1 tool call ·" in out.stdout and "0 LLM calls" in out.stdout
    assert "tools: 1 call," in out.stdout
    checked = treadle("validate", f"{prog}:graph")
    assert "ok one: 1 node," in checked.stdout


def test_python_examples_print_their_result() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "research.py")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["report"]
    assert report["summary"].startswith("How do serving engines make LLM agents fast?")


def test_the_live_view_keeps_time_between_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live view is re-rendered on every refresh, so a running node's time moves on
    without an event."""
    from rich.console import Console

    from treadle.cli import display
    from treadle.runtime.core.events import NodeStarted

    now = [100.0]
    monkeypatch.setattr(display.time, "perf_counter", lambda: now[0])
    view = display.RunView(["slow"])
    view.feed(NodeStarted(seq=1, run_id="r", ts=0.0, node="slow"))
    console = Console(width=80, record=True)

    def shown() -> str:
        console.print(view)  # what `rich.live.Live` renders on each refresh
        return console.export_text()

    assert "0.0 s" in shown()
    now[0] += 2.5
    assert "2.5 s" in shown()


def test_resume_shows_the_live_view(tmp_path: Path) -> None:
    """In a terminal, `run --resume` draws the live view as a new run does."""
    import pty

    prog, env = _program(tmp_path)
    db = str(tmp_path / "runs.db")
    base = [sys.executable, "-m", "treadle", "run", "--db", db]
    first = subprocess.run(
        [*base, "--json", f"{prog}:graph", "--input", '{"x": 1}'],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    run_id = json.loads(first.stdout)["run_id"]
    (tmp_path / "fixed").write_text("")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([*base, "--resume", run_id], stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the command has ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "\x1b[?25l" in text  # the live display hides the cursor while it draws
    assert "succeeded" in text and "✓" in text
