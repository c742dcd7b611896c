"""`SchedulerAdmission` in real runs: every LLM call of a `Runtime` goes through the
scheduler; pins are requested from a backend that can pin, reported as `PinSet` /
`PinReleased` events, released on the next call and on cancel, and never requested after
the last LLM step. The backend is the simulator in-process (`SimBackend`)."""

from __future__ import annotations

import anyio
import pytest

from treadle import Graph, Runtime, ScriptedBackend, ScriptRule, tool
from treadle.backends.base import LLMRequest, LLMResponse
from treadle.backends.sim.backend import SimBackend
from treadle.runtime.core.events import Event, LLMCallDispatched, PinReleased, PinSet, RunFinished
from treadle.runtime.sched.admission import SchedulerAdmission

pytestmark = pytest.mark.anyio

SYSTEM = " ".join(f"Rule {i}: inspect the repository before you answer." for i in range(20))


@tool(expected_duration_s=60.0)
async def run_checks(path: str) -> str:
    """Run the repository's checks on a path (declared slow: the pin TTL is long)."""
    await anyio.sleep(0.01)
    return f"checks passed for {path}"


@tool(expected_duration_s=60.0)
async def run_forever(path: str) -> str:
    """A check that does not come back before the run is cancelled."""
    await anyio.sleep(30)
    return "never"


def _rules(tool_name: str) -> list[ScriptRule]:
    return [
        ScriptRule(match="Fix", tool_calls=[{"name": tool_name, "arguments": {"path": "src/"}}]),
        ScriptRule(match="Fix", content="All checks pass; the fix is done."),
    ]


def _graph(name: str, t: object, *, then_summary: bool = False) -> Graph:
    g = Graph(name, inputs={"task": str})
    fix = g.llm("fix", "Fix: {task}", system=SYSTEM, tools=[t], inputs={"task": g.input.task})
    if then_summary:
        summary = g.llm("summarize", "Summarize: {r}", inputs={"r": fix.out})
        g.output(result=summary.out)
    else:
        g.output(result=fix.out)
    return g


def _backend(tool_name: str) -> SimBackend:
    return SimBackend(
        rules=_rules(tool_name),
        speed=10.0,
        policy="priority",
    )


async def test_pins_are_set_and_released_on_the_next_call() -> None:
    backend = _backend("run_checks")
    graph = _graph("fixer", run_checks, then_summary=True)
    async with SchedulerAdmission(tools=[run_checks]) as admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        admission.register_graph(runtime.compile(graph))
        result = await runtime.run(graph, {"task": "the failing import"})
    pin_sets = [e for e in result.events if isinstance(e, PinSet)]
    released = [e for e in result.events if isinstance(e, PinReleased)]
    # the first turn asked for a tool: its KV was pinned for the tool's predicted time
    # (a quantile of the declared 60 s), and released when the conversation's next call
    # arrived, in time
    first = pin_sets[0]
    assert (first.node, first.call_id) == ("fix", "fix#1") and first.ttl_s > 1.0
    assert (released[0].call_id, released[0].reason, released[0].used) == (
        "fix#1",
        "next_call",
        True,
    )
    # the second turn answered without a tool call: the conversation is over, so the pin
    # the server set is released at once
    assert [(e.call_id, e.reason) for e in released[1:]] == [("fix#2", "no_tool_call")]
    # the summary is the program's last LLM step: no pin was even asked for
    assert [e.node for e in pin_sets] == ["fix", "fix"]
    metrics = backend.metrics()
    assert metrics.pins_set == 2 and metrics.pins_released == 2 and metrics.pins_active == 0
    # every call went through the scheduler, with its priority
    assert len([e for e in result.events if isinstance(e, LLMCallDispatched)]) == 3
    assert admission.scheduler.queued_calls == 0 and not admission.scheduler.programs


async def test_pin_released_when_the_run_is_cancelled() -> None:
    backend = _backend("run_forever")
    graph = _graph("stuck", run_forever)
    async with SchedulerAdmission(tools=[run_forever]) as admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        streamed: list[Event] = []
        async with runtime.start(graph, {"task": "the flaky test"}) as run:
            async for event in run.events():
                streamed.append(event)
                if isinstance(event, PinSet):
                    assert backend.metrics().pins_active == 1
                    run.cancel()
            result = await run.result()
    assert result.status == "cancelled"
    released = [e for e in result.events if isinstance(e, PinReleased)]
    assert [(e.reason, e.used) for e in released] == [("cancelled", False)]
    # the release is part of the run: before its RunFinished, so event streams see it
    assert isinstance(result.events[-1], RunFinished)
    assert released[0] in streamed
    # the server-side pin went too (released through the backend, not left to expire)
    assert backend.metrics().pins_active == 0
    assert backend.metrics().pins_expired == 0


async def test_backends_without_pinning_get_priorities_but_no_ttl() -> None:
    seen: list[LLMRequest] = []

    class Recording(ScriptedBackend):
        async def generate(self, request: LLMRequest) -> LLMResponse:
            seen.append(request)
            return await super().generate(request)

    graph = _graph("plain", run_checks)
    async with SchedulerAdmission(tools=[run_checks]) as admission:
        runtime = Runtime(models={"default": Recording(_rules("run_checks"))}, admission=admission)
        result = await runtime.run(graph, {"task": "x"})
    assert not [e for e in result.events if isinstance(e, PinSet | PinReleased)]
    assert len(seen) == 2
    assert all(r.hints.pin_ttl_s is None for r in seen)
    assert all(r.hints.program_id == result.run_id for r in seen)


async def test_many_runs_share_one_scheduler_and_all_finish() -> None:
    backend = _backend("run_checks")
    graph = _graph("fleet", run_checks)
    async with SchedulerAdmission(tools=[run_checks], tenant_weights={"a": 1, "b": 2}) as adm:
        runtime = Runtime(models={"default": backend}, admission=adm)
        results: list[str] = []

        async def one(i: int) -> None:
            r = await runtime.run(graph, {"task": f"issue {i}"}, tenant="a" if i % 2 else "b")
            results.append(r.status)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
    assert results == ["succeeded"] * 8
    assert set(adm.scheduler.tenants) >= {"a", "b"}
    assert adm.scheduler.tenants["b"].service_s > 0 and adm.scheduler.tenants["a"].service_s > 0
    assert backend.metrics().pins_active == 0


@tool(expected_duration_s=60.0)
async def deploy(path: str) -> str:
    """Deploy (declared slow)."""
    await anyio.sleep(0.01)
    return "deployed"


@tool(expected_duration_s=0.005)
async def lint(path: str) -> str:
    """Lint (declared fast; this one takes longer than declared)."""
    await anyio.sleep(0.4)
    return "clean"


async def test_the_answer_s_tool_shortens_the_pin() -> None:
    """The request's TTL comes from the node's first tool (slow); the answer calls the fast
    one, so the pin is released at that tool's own predicted duration."""
    rules = [
        ScriptRule(match="Fix", tool_calls=[{"name": "lint", "arguments": {"path": "src/"}}]),
        ScriptRule(match="Fix", content="done"),
    ]
    backend = SimBackend(rules=rules, speed=10.0, policy="priority")
    g = Graph("two-tools", inputs={"task": str})
    node = g.llm(
        "fix", "Fix: {task}", system=SYSTEM, tools=[deploy, lint], inputs={"task": g.input.task}
    )
    g.output(result=node.out)
    async with SchedulerAdmission(tools=[deploy, lint]) as admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        result = await runtime.run(g, {"task": "style"})
    pin_sets = [e for e in result.events if isinstance(e, PinSet)]
    released = [(e.call_id, e.reason) for e in result.events if isinstance(e, PinReleased)]
    assert pin_sets[0].ttl_s > 1.0  # asked with the slow tool's quantile
    assert released[0] == ("fix#1", "tool_estimate")
    assert backend.metrics().pins_active == 0


async def test_with_a_kv_budget_runs_wait_for_room_and_all_finish() -> None:
    """Real runs admitted by KV working set: a run's working set (about 350-600 tokens
    here) leaves no room for a second one in 700, so the runs take turns (never two
    resident at once), and all finish."""
    backend = _backend("run_checks")
    graph = _graph("budgeted", run_checks)
    async with SchedulerAdmission(tools=[run_checks], kv_budget_tokens=700) as adm:
        runtime = Runtime(models={"default": backend}, admission=adm)
        most_resident = 0
        seen_ws: set[int] = set()
        original = adm.scheduler.admit_waiting

        def watch(now: float) -> int:
            nonlocal most_resident
            n = original(now)
            for ln in adm.scheduler.lanes:
                most_resident = max(most_resident, len(ln.residents))
                seen_ws.update(p.kv_tokens for p in ln.residents.values())
            return n

        adm.scheduler.admit_waiting = watch  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            results: list[str] = []

            async def one(i: int) -> None:
                results.append((await runtime.run(graph, {"task": f"issue {i}"})).status)

            for i in range(4):
                tg.start_soon(one, i)
    assert results == ["succeeded"] * 4
    assert most_resident == 1 and max(seen_ws) <= 700 < 2 * min(seen_ws), seen_ws
    lane = adm.scheduler.lanes[0]
    assert lane.kv_budget == 700 and lane.kv_reserved == 0 and not lane.residents
