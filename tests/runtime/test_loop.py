"""Bounded loops: a body graph runs until a typed condition says stop (at most
`max_iterations`), each iteration checkpointed as `<loop>[i]`, so a resumed run — after a
SIGKILL mid-iteration too — repeats no finished iteration. The static facts count a loop
as its expected iterations, refined from the runs' history."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from runtime_support import StoreFactory

from treadle import Graph, GraphValidationError, Runtime
from treadle.graphs.analysis import observe_iterations
from treadle.runtime.core.events import GraphExtended, NodeFinished

pytestmark = pytest.mark.anyio


class Attempt(BaseModel):
    code: str
    passed: bool
    tries: int


def attempt_body(ran: list[int]) -> Graph:
    """One fix attempt: it passes on the third try."""

    def fix(code: str, tries: int) -> Attempt:
        ran.append(tries)
        return Attempt(code=code + "+", passed=tries + 1 >= 3, tries=tries + 1)

    body = Graph("attempt", inputs={"code": str, "tries": int})
    result = body.func("fix", fix, inputs={"code": body.input.code, "tries": body.input.tries})
    body.output(code=result.out.code, passed=result.out.passed, tries=result.out.tries)
    return body


def looped(ran: list[int], **loop: Any) -> Graph:
    g = Graph("fixer", inputs={"code": str})
    options: dict[str, Any] = {"until": "passed", "max_iterations": 5, **loop}
    fixed = g.loop(
        "fix",
        attempt_body(ran),
        inputs={"code": g.input.code, "tries": 0},
        carry={"code": "code", "tries": "tries"},
        **options,
    )
    g.output(result=fixed)
    return g


async def test_a_loop_runs_until_its_condition_and_checkpoints_each_iteration() -> None:
    ran: list[int] = []
    result = await Runtime().run(looped(ran), {"code": "x"})
    assert result.output.result.code == "x+++" and result.output.result.tries == 3
    assert ran == [0, 1, 2]
    finished = [e.node for e in result.events if isinstance(e, NodeFinished)]
    assert finished == [
        "fix[0]/fix", "fix[0]", "fix[1]/fix", "fix[1]", "fix[2]/fix", "fix[2]", "fix",
    ]  # fmt: skip
    extended = [e.instances for e in result.events if isinstance(e, GraphExtended)]
    assert extended == [["fix[0]"], ["fix[1]"], ["fix[2]"]]


async def test_while_collect_all_and_the_bound() -> None:
    ran: list[int] = []

    def not_yet(out: Attempt) -> bool:
        return not out.passed

    everything = await Runtime().run(
        looped(ran, until=None, while_=not_yet, collect="all"), {"code": "y"}
    )
    assert [a.tries for a in everything.output.result] == [1, 2, 3]
    ran.clear()
    bounded = await Runtime().run(looped(ran, max_iterations=2), {"code": "z"})
    # the bound ends it: the last iteration's output, whatever the condition says
    assert ran == [0, 1] and bounded.output.result.passed is False


async def test_loops_are_checked_when_compiled() -> None:
    ran: list[int] = []
    body = attempt_body(ran)
    g = Graph("bad", inputs={"code": str})
    g.loop(
        "fix",
        body,
        inputs={"code": g.input.code, "tries": 0},
        carry={"code": "tries", "nope": "code"},
        until="code",
        while_="passed",
        max_iterations=0,
    )
    with pytest.raises(GraphValidationError) as err:
        g.compile()
    text = str(err.value)
    assert "max_iterations must be an int >= 1" in text
    assert "a loop takes one condition: until or while" in text
    assert "'code' must be a bool field, it is str" in text
    assert "carry: tries (int) does not fit input 'code' (str)" in text
    assert "carry: 'nope' is not an input of the body" in text


async def test_the_static_facts_count_expected_iterations_refined_from_history() -> None:
    ran: list[int] = []
    g = Graph("agent", inputs={"task": str})
    body = Graph("turn", inputs={"task": str})
    body.output(
        done=body.func("check", lambda draft: "done" in draft,
                       inputs={"draft": body.llm("draft", "Work on {task}",
                                                 inputs={"task": body.input.task})}).out
    )  # fmt: skip
    loop = g.loop("work", body, inputs={"task": g.input.task}, until="done",
                  max_iterations=10, expected_iterations=4)  # fmt: skip
    g.output(report=g.llm("report", "Report {x}", inputs={"x": loop}).out)
    cg = g.compile()
    # 4 expected turns of one LLM step each, then the report
    assert cg.facts.llm["report"].is_last_llm_step
    draft = cg.nodes["work"].child
    assert draft is not None
    assert draft.facts.llm["draft"].steps_to_execution == 3  # three more turns expected
    assert not draft.facts.llm["draft"].is_last_llm_step
    before = cg.facts.remaining_cost_s["work"]
    # history: runs ended after one turn: the expectation falls, and the facts with it
    for _ in range(20):
        expected = observe_iterations(cg, "work", 1)
    assert 1.0 <= expected < 1.1
    assert cg.facts.remaining_cost_s["work"] < before
    assert draft.facts.llm["draft"].steps_to_execution == 0
    del ran


# -- a process killed while its loop iterates -----------------------------------------

CHILD = """
import os, time
from pathlib import Path
from treadle import Graph

LOG = Path(os.environ["TREADLE_TEST_LOG"])

def attempt(n: int) -> dict:
    with LOG.open("a") as f:
        f.write(f"{n}\\n")
    if n == 3 and os.environ.get("TREADLE_TEST_HANG") and not (LOG.parent / "hung").exists():
        (LOG.parent / "hung").write_text("")
        time.sleep(600)  # killed here, in its fourth iteration
    return {"n": n + 1, "done": n + 1 >= 5}

body = Graph("step", inputs={"n": int})
out = body.func("attempt", attempt, inputs={"n": body.input.n})
body.output(n=out.out.n, done=out.out.done)

graph = Graph("counting", inputs={})
count = graph.loop("count", body, inputs={"n": 0}, carry={"n": "n"}, until="done",
                   max_iterations=8)
graph.output(n=count.out.n)
"""


@pytest.mark.parametrize("where", ["sqlite", "redis"])
async def test_sigkill_while_a_loop_iterates_repeats_no_finished_iteration(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treadle.cli.programs import load_program
    from treadle.runtime.stores.redis import RedisStore
    from treadle.runtime.stores.sqlite import SqliteStore

    program = tmp_path / "counting.py"
    program.write_text(textwrap.dedent(CHILD))
    log = tmp_path / "log.txt"
    store_arg = request.getfixturevalue("redis_url") if where == "redis" else "sqlite"
    db = tmp_path / "runs.db"
    env = {**os.environ, "TREADLE_TEST_LOG": str(log), "TREADLE_TEST_HANG": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "treadle", "run", f"{program}:graph", "--json",
         "--store", store_arg, "--db", str(db)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # wait until the fourth iteration is under way
        with_deadline(lambda: (tmp_path / "hung").exists(), child)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    store: Any = RedisStore(store_arg) if where == "redis" else SqliteStore(db)
    [record] = await store.list_runs()
    outputs = await store.load_outputs(record.run_id)
    assert {"count[0]", "count[1]", "count[2]"} <= set(outputs) and "count[3]" not in outputs
    monkeypatch.setenv("TREADLE_TEST_LOG", str(log))
    monkeypatch.delenv("TREADLE_TEST_HANG", raising=False)
    graph = load_program(f"{program}:graph")
    try:
        result = await Runtime(store=store).resume(record.run_id, graph)
    finally:
        await store.close()
    assert result.output.n == 5
    # iterations 0-2 finished before the kill and ran once; 3 was running and ran again
    assert log.read_text().split() == ["0", "1", "2", "3", "3", "4"]


def with_deadline(ready: Any, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the child exited early: {err.decode()[-2000:]}")
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.05)


async def test_a_resumed_loop_reloads_its_finished_iterations(
    store_factory: StoreFactory,
) -> None:
    """An iteration that fails ends the run; resuming it (on every store) runs only that
    iteration and the ones after it."""
    ran: list[int] = []
    broken = {"once": True}

    def fix(code: str, tries: int) -> Attempt:
        ran.append(tries)
        if tries == 2 and broken.pop("once", False):
            raise RuntimeError("flaky test runner")
        return Attempt(code=code + "+", passed=tries + 1 >= 4, tries=tries + 1)

    body = Graph("attempt", inputs={"code": str, "tries": int})
    result = body.func("fix", fix, inputs={"code": body.input.code, "tries": body.input.tries})
    body.output(code=result.out.code, passed=result.out.passed, tries=result.out.tries)
    g = Graph("fixer", inputs={"code": str})
    loop = g.loop(
        "fix",
        body,
        inputs={"code": g.input.code, "tries": 0},
        carry={"code": "code", "tries": "tries"},
        until="passed",
        max_iterations=6,
    )
    g.output(result=loop)  # fmt: skip
    first_store = store_factory()
    failed = await Runtime(store=first_store).run(g, {"code": "x"}, check=False)
    assert failed.status == "failed" and ran == [0, 1, 2]
    if first_store is not store_factory():
        await first_store.close()
    second_store = store_factory()
    done = await Runtime(store=second_store).resume(failed.run_id, g)
    await second_store.close()
    assert done.output.result.tries == 4
    assert ran == [0, 1, 2, 2, 3]  # 0 and 1 were reloaded, not run again
