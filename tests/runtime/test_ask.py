"""Human input (`ask`): a run parks durably (`waiting`, holding nothing), its request is
readable from its events and its record, and it resumes with an answer checked against the
request's type — in this process, in another one, after the waiting process was killed —
without running any finished node again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from runtime_support import StoreFactory

from treadle import ITEM, Graph, Runtime, ScriptRule, step, tool
from treadle.backends.sim.backend import SimBackend
from treadle.runtime.core.events import (
    InputReceived,
    InputRequested,
    LLMCallDispatched,
    PinReleased,
    PinSet,
    RunFinished,
    RunStarted,
    RunWaiting,
)
from treadle.runtime.core.store import StateStore
from treadle.runtime.execution.inputs import InputConflict, InputRejected
from treadle.runtime.observe.tracing import T_STATUS, OtelTracer
from treadle.runtime.sched.admission import SchedulerAdmission

pytestmark = pytest.mark.anyio


class Approval(BaseModel):
    approved: bool
    note: str = ""


def approval_graph(ran: list[str]) -> Graph:
    """plan -> approve (ask) -> act, with `audit` running beside the ask."""

    def plan(cmd: str) -> str:
        ran.append("plan")
        return f"will run {cmd}"

    def audit(cmd: str) -> int:
        ran.append("audit")
        return len(cmd)

    def act(plan: str, approval: Approval, size: int) -> str:
        ran.append("act")
        return f"{plan}: {'done' if approval.approved else 'refused'} ({size})"

    g = Graph("approval", inputs={"cmd": str})
    p = g.func("plan", plan, inputs={"cmd": g.input.cmd})
    a = g.ask("approve", "Run `{cmd}`? {plan}", output=Approval,
              inputs={"cmd": g.input.cmd, "plan": p})  # fmt: skip
    size = g.func("audit", audit, inputs={"cmd": g.input.cmd})
    g.output(result=g.func("act", act, inputs={"plan": p, "approval": a, "size": size}).out)
    return g


async def test_a_run_waits_durably_and_resumes_in_another_runtime(
    store_factory: StoreFactory,
) -> None:
    ran: list[str] = []
    graph = approval_graph(ran)
    first = store_factory()
    result = await Runtime(store=first).run(graph, {"cmd": "rm -rf build/"})
    assert result.status == "waiting" and result.waiting and result.output is None
    [request] = result.pending
    assert request.node == "approve"
    assert request.prompt == "Run `rm -rf build/`? will run rm -rf build/"
    assert request.answer_schema["required"] == ["approved"] and not request.has_default
    # the request is readable from the store (a web UI's form) and from the journal
    record = await first.get_run(result.run_id)
    assert record is not None and record.status == "waiting"
    assert [r.node for r in record.pending_inputs] == ["approve"]
    journal = await first.read_events(result.run_id)
    asked = [e for e in journal if isinstance(e, InputRequested)]
    assert [(e.node, e.prompt) for e in asked] == [("approve", request.prompt)]
    assert asked[0].answer_schema == request.answer_schema
    assert isinstance(journal[-1], RunWaiting) and journal[-1].nodes == ["approve"]
    assert sorted(ran) == ["audit", "plan"]
    if first is not store_factory():  # a durable store: another process would open it anew
        await first.close()

    second = store_factory()
    resumed = await Runtime(store=second).resume(
        result.run_id, graph, {"approved": True, "note": "ok"}
    )
    assert resumed.status == "succeeded"
    assert resumed.output.result == "will run rm -rf build/: done (13)"
    # nothing that finished before the wait ran again
    assert sorted(ran) == ["act", "audit", "plan"]
    received = [e for e in resumed.events if isinstance(e, InputReceived)]
    assert [(e.node, e.defaulted) for e in received] == [("approve", False)]
    record = await second.get_run(result.run_id)
    assert record is not None and record.status == "succeeded" and record.pending_inputs == []
    await second.close()


async def test_answers_are_checked_and_idempotent_on_their_key(store: StateStore) -> None:
    ran: list[str] = []
    graph = approval_graph(ran)
    runtime = Runtime(store=store)
    waiting = await runtime.run(graph, {"cmd": "deploy"})
    with pytest.raises(InputRejected, match="approved: Field required"):
        await runtime.resume(waiting.run_id, graph, {"note": "no decision"}, key="k1")
    with pytest.raises(InputConflict, match="not waiting for input at 'act'"):
        await runtime.resume(waiting.run_id, graph, {"approved": True}, node="act")
    record = await store.get_run(waiting.run_id)
    assert record is not None and record.status == "waiting"  # nothing was recorded
    done = await runtime.resume(waiting.run_id, graph, {"approved": False}, key="k1")
    assert done.output.result == "will run deploy: refused (6)"
    # the same answer again with its key (a retry after a lost reply) changes nothing
    again = await runtime.resume(waiting.run_id, graph, {"approved": False}, key="k1")
    assert again.output.result == done.output.result
    assert ran.count("act") == 1
    with pytest.raises(InputConflict, match="answered already"):
        await runtime.resume(waiting.run_id, graph, {"approved": True}, node="approve", key="k2")
    with pytest.raises(InputConflict, match=r"\(succeeded\) is not waiting for input"):
        await runtime.resume(waiting.run_id, graph, {"approved": True}, key="k2")


async def test_the_handle_resumes_in_process_and_its_events_go_on() -> None:
    ran: list[str] = []
    graph = approval_graph(ran)
    runtime = Runtime()
    async with runtime.start(graph, {"cmd": "ls"}) as run:
        seen = [e async for e in run.events()]  # up to the wait, then the loop ends
        assert isinstance(seen[-1], RunWaiting)
        assert (await run.result()).status == "waiting"
        assert [r.node for r in run.pending] == ["approve"]
        await run.resume(Approval(approved=True))
        rest = [e async for e in run.events(after=len(seen))]
        result = await run.result()
    assert result.status == "succeeded" and result.output.result == "will run ls: done (2)"
    assert isinstance(rest[0], RunStarted) and rest[0].resumed
    assert isinstance(rest[-1], RunFinished)
    assert run.pending == []
    with pytest.raises(InputConflict, match="not waiting"):
        await run.resume(Approval(approved=True))


async def test_a_deadline_answers_with_the_default_or_fails_the_node(store: StateStore) -> None:
    g = Graph("deadline", inputs={})
    ok = g.ask("ok", "Proceed?", output=bool, deadline_s=0.2, default=False)
    g.output(ok=ok)
    runtime = Runtime(store=store)
    # while the handle is held, the deadline resumes the run by itself
    async with runtime.start(g) as run:
        seen = [e async for e in run.events()]
        assert isinstance(seen[-1], RunWaiting)
        with anyio.fail_after(10):
            rest = [e async for e in run.events(after=len(seen))]  # nobody answers
        assert isinstance(rest[-1], RunFinished)
        result = await run.result()
    assert result.status == "succeeded" and result.output.ok is False
    assert [e.defaulted for e in result.events if isinstance(e, InputReceived)] == [True]
    # left waiting, it takes the default when it is resumed after the deadline
    left = await runtime.run(g)
    assert left.status == "waiting" and left.pending[0].expires_at is not None
    await anyio.sleep(max(0.0, left.pending[0].expires_at - time.time()) + 0.01)
    assert (await runtime.resume(left.run_id, g)).output.ok is False
    # without a default, an expired request fails the node
    strict = Graph("strict", inputs={})
    strict.output(ok=strict.ask("ok", "Proceed?", output=bool, deadline_s=0.05))
    waiting = await runtime.run(strict)
    assert waiting.status == "waiting"
    await anyio.sleep(0.1)
    failed = await runtime.resume(waiting.run_id, strict, check=False)
    assert failed.status == "failed" and "no answer within 0.05 s" in (failed.error or "")


async def test_a_map_of_asks_waits_on_each_and_resumes_with_each_answer() -> None:
    g = Graph("reviews", inputs={"docs": list[str]})
    reviews = g.map(
        "review", g.input.docs, step.ask("Approve {doc}?", output=bool, inputs={"doc": ITEM})
    )
    g.output(approved=reviews)
    runtime = Runtime()
    waiting = await runtime.run(g, {"docs": ["a.md", "b.md"]})
    assert [(r.node, r.prompt) for r in waiting.pending] == [
        ("review[0]", "Approve a.md?"),
        ("review[1]", "Approve b.md?"),
    ]
    with pytest.raises(InputRejected, match="waits on 2 requests"):
        await runtime.resume(waiting.run_id, g, True)
    half = await runtime.resume(waiting.run_id, g, False, node="review[1]")
    assert half.status == "waiting" and [r.node for r in half.pending] == ["review[0]"]
    done = await runtime.resume(waiting.run_id, g, True)  # the one request left
    assert done.output.approved == [True, False]


async def test_cancelling_a_waiting_run() -> None:
    g = Graph("cancel", inputs={})
    g.output(ok=g.ask("ok", "Proceed?", output=bool))
    runtime = Runtime()
    async with runtime.start(g) as run:
        assert (await run.result()).status == "waiting"
        run.cancel()
        result = await run.result()
    assert result.status == "cancelled"
    record = await runtime.store.get_run(result.run_id)
    assert record is not None and record.status == "cancelled" and record.pending_inputs == []


@tool(expected_duration_s=60.0)
async def deploy(path: str) -> str:
    """Deploy (declared slow: the model's KV is worth pinning while it runs)."""
    return f"deployed {path}"


async def test_a_waiting_run_holds_no_scheduler_slot_or_pin_and_is_readmitted() -> None:
    """The pin a failed tool conversation left is released when the run parks (reason
    `waiting`); the scheduler forgets the run; its next LLM call, after the answer, opens
    a new program."""
    system = " ".join(f"Rule {i}: check twice." for i in range(20))
    rules = [
        ScriptRule(match="Ship", tool_calls=[{"name": "deploy", "arguments": {"path": "/"}}]),
        ScriptRule(match="Summarise", content="summary"),
    ]
    backend = SimBackend(rules=rules, speed=10.0, policy="priority")
    g = Graph("ship", inputs={"task": str})
    # one turn only: the model asks for the tool, the node gives up (skipped) and its pin stays
    g.llm("ship", "Ship: {task}", system=system, tools=[deploy], max_turns=1,
          inputs={"task": g.input.task}, on_error="skip")  # fmt: skip
    ok = g.ask("confirm", "Summarise {task}?", output=bool, inputs={"task": g.input.task})
    summary = g.llm("summary", "Summarise: {ok}", inputs={"ok": ok})
    g.output(summary=summary)
    async with SchedulerAdmission(tools=[deploy]) as admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        waiting = await runtime.run(g, {"task": "v2"})
        assert waiting.status == "waiting"
        pins = [e for e in waiting.events if isinstance(e, PinSet | PinReleased)]
        assert [type(e).__name__ for e in pins] == ["PinSet", "PinReleased"]
        assert isinstance(pins[1], PinReleased) and pins[1].reason == "waiting"
        assert admission.pins.get(waiting.run_id) is None
        assert waiting.run_id not in admission.scheduler.programs
        assert admission.scheduler.queued_calls == 0
        assert backend.metrics().pins_active == 0
        done = await runtime.resume(waiting.run_id, g, True)
    assert done.output.summary == "summary"
    calls = [e.node for e in done.events if isinstance(e, LLMCallDispatched)]
    assert calls == ["summary"]  # re-admitted by the scheduler
    assert not admission.scheduler.programs


async def test_a_waiting_run_ends_its_trace_span_and_the_resumed_one_links_to_it() -> None:
    tracer, exporter = OtelTracer.in_memory()
    ran: list[str] = []
    graph = approval_graph(ran)
    runtime = Runtime(listeners=[tracer.listener])
    waiting = await runtime.run(graph, {"cmd": "ls"})
    await runtime.resume(waiting.run_id, graph, {"approved": True})
    runs = [s for s in exporter.get_finished_spans() if s.name.startswith("invoke_workflow ")]
    assert [s.attributes[T_STATUS] for s in runs] == ["waiting", "succeeded"]
    assert runs[1].links[0].context.span_id == runs[0].context.span_id
    asked = [
        s for s in exporter.get_finished_spans() if s.attributes.get("treadle.node") == "approve"
    ]
    assert any(ev.name == "input_requested" for s in asked for ev in s.events)


# -- a process killed while its run waits ---------------------------------------------

CHILD = """
import os, sys
from pathlib import Path
import anyio
from treadle import Graph, Runtime
from treadle.runtime.stores.sqlite import SqliteStore
from treadle.runtime.stores.redis import RedisStore

LOG = Path(os.environ["TREADLE_TEST_LOG"])

def step(name: str, x: str) -> str:
    with LOG.open("a") as f:
        f.write(name + "\\n")
    return name + ":" + x

def first(x: str) -> str: return step("first", x)
def second(x: str) -> str: return step("second", x)
def last(x: str, ok: bool) -> str: return step("last", x) + (" ok" if ok else " no")

graph = Graph("killed", inputs={"x": str})
a = graph.func("first", first, inputs={"x": graph.input.x})
b = graph.func("second", second, inputs={"x": a})
ok = graph.ask("approve", "Go on with {x}?", output=bool, inputs={"x": b})
graph.output(out=graph.func("last", last, inputs={"x": b, "ok": ok}).out)

def store():
    where = os.environ["TREADLE_TEST_STORE"]
    return RedisStore(where) if where.startswith("redis://") else SqliteStore(where)

async def main() -> None:
    runtime = Runtime(store=store())
    async with runtime.start(graph, {"x": "in"}, run_id="killed-run") as run:
        print((await run.result()).status, flush=True)
        await anyio.sleep(600)  # holding the waiting run in this process until killed

if __name__ == "__main__":
    anyio.run(main)
"""


@pytest.mark.parametrize("where", ["sqlite", "redis"])
async def test_sigkill_while_a_run_waits_loses_nothing(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treadle.cli.programs import load_program
    from treadle.runtime.stores.redis import RedisStore
    from treadle.runtime.stores.sqlite import SqliteStore

    target = request.getfixturevalue("redis_url") if where == "redis" else str(tmp_path / "r.db")
    program = tmp_path / "child.py"
    program.write_text(textwrap.dedent(CHILD))
    log = tmp_path / "log.txt"
    env = {**os.environ, "TREADLE_TEST_LOG": str(log), "TREADLE_TEST_STORE": target}
    child = subprocess.Popen(
        [sys.executable, str(program)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "waiting"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    store: Any = RedisStore(target) if where == "redis" else SqliteStore(target)
    record = await store.get_run("killed-run")
    assert record is not None and record.status == "waiting"
    assert record.pending_inputs[0].prompt == "Go on with second:first:in?"
    monkeypatch.setenv("TREADLE_TEST_LOG", str(log))
    graph = load_program(f"{program}:graph")
    try:
        result = await Runtime(store=store).resume("killed-run", graph, True)
    finally:
        await store.close()
    assert result.output.out == "last:second:first:in ok"
    assert log.read_text().split() == ["first", "second", "last"]
