"""The planner node inside runs: dependency order, overlap, dispatch while the plan still
streams, replanning, malformed plans, checkpoints and resume. All by event order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from treadle import Graph, Runtime, ScriptedBackend, ScriptRule
from treadle.backends.base import Capabilities, LLMRequest, LLMResponse, StreamChunk
from treadle.runtime.core.events import (
    Event,
    GraphExtended,
    LLMCallFinished,
    LLMTokens,
    NodeFailed,
    NodeFinished,
    NodeSkipped,
    NodeStarted,
    ToolCallFinished,
    ToolCallStarted,
)
from treadle.runtime.nodes.planner.executor import planned_tasks
from treadle.runtime.stores.memory import MemoryStore
from treadle.tools import Tool, calculator, tool

pytestmark = pytest.mark.anyio

#: every test run is bounded: a planner bug must fail the test, not hang it
LIMIT_S = 10


class Recording(ScriptedBackend):
    """A scripted model that keeps the requests it answered."""

    def __init__(self, rules: list[ScriptRule]) -> None:
        super().__init__(rules)
        self.requests: list[LLMRequest] = []

    async def generate(self, request: LLMRequest) -> LLMResponse:
        self.requests.append(request)
        return await super().generate(request)

    def ids(self) -> list[str]:
        return [(r.hints.request_id or "").rsplit(":", 1)[-1] for r in self.requests]


def first(events: list[Event], cls: type[Event], node: str | None = None, **match: Any) -> int:
    for e in events:
        if (
            isinstance(e, cls)
            and (node is None or getattr(e, "node", None) == node)
            and all(getattr(e, k) == v for k, v in match.items())
        ):
            return e.seq
    raise AssertionError(f"no {cls.__name__} for {node} {match}")


def planner_graph(tools: list[Tool], *, output: Any = str, max_replans: int = 2) -> Graph:
    g = Graph("planned", inputs={"q": str})
    p = g.planner(
        "plan",
        "Task: {q}",
        tools=tools,
        inputs={"q": g.input.q},
        output=output,
        max_replans=max_replans,
    )
    g.output(answer=p.out)
    return g


def finish_with_last_observation() -> ScriptRule:
    return ScriptRule(
        match=r"^Question:.*\nObservation: ([^\n]+)",
        content="Thought: The last observation answers it.\nAction: Finish({groups[1]})",
    )


async def run(g: Graph, backend: ScriptedBackend, q: str = "go", **runtime: Any) -> Any:
    with anyio.fail_after(LIMIT_S):
        return await Runtime(models={"default": backend}, **runtime).run(g, {"q": q}, check=False)


# -- dependency order, overlap, streaming ------------------------------------------------


async def test_dependencies_are_honoured_and_values_are_typed() -> None:
    plan = (
        '1. calculator("6 * 7")\n2. calculator("2 + 1")\n'
        '3. calculator("$1 / $2")\n4. join()<END_OF_PLAN>'
    )
    backend = Recording([finish_with_last_observation(), ScriptRule(match="Task:", content=plan)])
    result = await run(planner_graph([calculator]), backend)
    assert result.ok, result.error
    assert result.output.answer == "14.0"
    ev = result.events
    for dep in ("plan/task1", "plan/task2"):
        assert first(ev, NodeFinished, dep) < first(ev, NodeStarted, "plan/task3")
    extended = [i for e in ev if isinstance(e, GraphExtended) for i in e.instances]
    assert extended == ["plan/task1", "plan/task2", "plan/task3"]
    assert backend.ids() == ["plan1", "join1"]
    joiner_prompt = backend.requests[1].messages[-1].content or ""
    assert '3. calculator("$1 / $2")\nObservation: 14.0' in joiner_prompt


both_started = anyio.Event()
second_started = anyio.Event()


@tool
async def wait_for_second(x: str) -> str:
    """Returns only once `second` has started (so it cannot finish first if sequential)."""
    await second_started.wait()
    return f"first {x}"


@tool
async def second(x: str) -> str:
    """Signals that it started."""
    second_started.set()
    return f"second {x}"


async def test_independent_tasks_overlap() -> None:
    global second_started
    second_started = anyio.Event()
    plan = '1. wait_for_second("a")\n2. second("b")\n3. join()'
    backend = Recording([finish_with_last_observation(), ScriptRule(match="Task:", content=plan)])
    result = await run(planner_graph([wait_for_second, second]), backend)
    assert result.ok, result.error
    ev = result.events
    assert first(ev, ToolCallStarted, "plan/task2") < first(ev, ToolCallFinished, "plan/task1")


async def test_a_task_starts_before_the_plan_has_finished_streaming() -> None:
    plan = (
        'Thought: two steps.\n1. calculator("1 + 1")\n2. calculator("$1 * 10")\n'
        "Thought: the second needs the first, and now we are done.\n3. join()<END_OF_PLAN>"
    )
    backend = Recording([finish_with_last_observation(), ScriptRule(match="Task:", content=plan)])
    result = await run(planner_graph([calculator]), backend, stream_tokens=True)
    assert result.ok and result.output.answer == "20"
    ev = result.events
    plan_done = first(ev, LLMCallFinished, "plan", call_id="plan#1")
    last_token = max(e.seq for e in ev if isinstance(e, LLMTokens) and e.call_id == "plan#1")
    started = first(ev, ToolCallStarted, "plan/task1")
    assert started < last_token < plan_done


class HoldsStream(ScriptedBackend):
    """Streams the plan up to `hold_after`, then waits for `gate` before the rest: if the
    planner waited for the whole plan, the gate (set by a task) would never open."""

    def __init__(self, rules: list[ScriptRule], hold_after: str) -> None:
        super().__init__(rules)
        self.hold_after = hold_after

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        text = (await self.generate(request)).content or ""
        cut = text.find(self.hold_after)
        cut = len(text) if cut < 0 else cut + len(self.hold_after)
        yield StreamChunk(delta=text[:cut])
        if cut < len(text):
            await second_started.wait()
            yield StreamChunk(delta=text[cut:])
        yield StreamChunk(finish_reason="stop")


async def test_a_dependent_task_runs_while_the_plan_is_still_streaming() -> None:
    global second_started
    second_started = anyio.Event()
    plan = '1. quick("a")\n2. second("$1")\nThought: that was all.\n3. join()'
    backend = HoldsStream(
        [finish_with_last_observation(), ScriptRule(match="Task:", content=plan)],
        hold_after='second("$1")\n',
    )
    result = await run(planner_graph([quick, second]), backend, stream_tokens=True)
    assert result.output.answer == "second <a>"
    ev = result.events
    tokens = [e.seq for e in ev if isinstance(e, LLMTokens) and e.call_id == "plan#1"]
    assert first(ev, NodeFinished, "plan/task1") < first(ev, ToolCallStarted, "plan/task2")
    assert first(ev, ToolCallFinished, "plan/task2") < tokens[-1]


class EndlessAfterJoin(ScriptedBackend):
    """Streams the plan a token at a time and, after it, would never stop writing: the
    planner must close the stream once `join()` has arrived."""

    def __init__(self, rules: list[ScriptRule]) -> None:
        super().__init__(rules)
        self.closed_after: list[str] = []

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        text = (await self.generate(request)).content or ""
        if "Observation" in text or "Action:" in text:  # the joiner: answer at once
            yield StreamChunk(delta=text)
            yield StreamChunk(finish_reason="stop")
            return
        sent = ""
        try:
            for piece in [*text.split(" "), *["<END_OF_PLAN>"] * 1000]:
                sent += piece + " "
                yield StreamChunk(delta=piece + " ")
                await anyio.sleep(0)
            raise AssertionError("the planner read the stream past join()")
        finally:
            self.closed_after.append(sent)


async def test_the_plan_stream_is_closed_at_join() -> None:
    plan = '1. calculator("3 * 3")\n2. join()'
    backend = EndlessAfterJoin(
        [finish_with_last_observation(), ScriptRule(match="Task:", content=plan)]
    )
    result = await run(planner_graph([calculator]), backend)
    assert result.ok, result.error
    assert result.output.answer == "9"
    assert backend.closed_after == ['1. calculator("3 * 3")\n2. join() ']
    plan_call = next(
        e for e in result.events if isinstance(e, LLMCallFinished) and e.call_id == "plan#1"
    )
    assert plan_call.error is None and plan_call.finish_reason == "stop"


async def test_a_plan_stream_closed_at_join_still_counts_its_tokens() -> None:
    """14.3: the stream is closed before its usage chunk; the call counts what was sent and
    what was received, so run totals, spans and token quotas include it."""
    from treadle.runtime.observe.metrics import summarize_run

    plan = '1. calculator("3 * 3")\n2. join()'
    backend = EndlessAfterJoin(
        [finish_with_last_observation(), ScriptRule(match="Task:", content=plan)]
    )
    result = await run(planner_graph([calculator]), backend)
    assert result.ok, result.error
    plan_call = next(
        e for e in result.events if isinstance(e, LLMCallFinished) and e.call_id == "plan#1"
    )
    # the planner's system prompt alone is hundreds of characters; the plan up to join()
    # is 30 characters
    assert plan_call.prompt_tokens > 50
    assert plan_call.completion_tokens == len('1. calculator("3 * 3")\n2. join() ') // 4
    totals = summarize_run(result.events)
    assert totals.tokens_in >= plan_call.prompt_tokens


class NonStreaming:
    """A backend without `stream`: the planner parses the whole answer at once."""

    def __init__(self, inner: ScriptedBackend) -> None:
        self.inner = inner

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=False)

    async def generate(self, request: LLMRequest) -> LLMResponse:
        return await self.inner.generate(request)


async def test_a_backend_that_cannot_stream_gets_the_whole_plan_parsed() -> None:
    plan = '1. calculator("2 ** 5")\n2. calculator("$1 + 1")\n3. join()'
    inner = Recording([finish_with_last_observation(), ScriptRule(match="Task:", content=plan)])
    with anyio.fail_after(LIMIT_S):
        result = await Runtime(models={"default": NonStreaming(inner)}, stream_tokens=True).run(
            planner_graph([calculator]), {"q": "go"}
        )
    assert result.output.answer == "33"
    assert not any(isinstance(e, LLMTokens) for e in result.events)
    plan_done = first(result.events, LLMCallFinished, "plan", call_id="plan#1")
    assert plan_done < first(result.events, ToolCallStarted, "plan/task1")


class Answer(BaseModel):
    value: float
    note: str


async def test_the_answer_is_parsed_into_the_output_type_with_one_repair() -> None:
    plan = '1. calculator("3 * 3")\n2. join()'
    backend = Recording(
        [
            ScriptRule(match="was invalid", content='Action: Finish({"value": 9, "note": "ok"})'),
            ScriptRule(match="^Question:", content="Action: Finish(nine)"),
            ScriptRule(match="Task:", content=plan),
        ]
    )
    result = await run(planner_graph([calculator], output=Answer), backend)
    assert result.output.answer == Answer(value=9, note="ok")
    assert backend.ids() == ["plan1", "join1", "join1"]
    joiner_system = backend.requests[1].messages[0].content or ""
    assert '"value"' in joiner_system  # the schema is in the joiner's instructions


# -- replanning --------------------------------------------------------------------------


@tool
async def lookup(key: str) -> str:
    """Look up a key."""
    table = {"k2": "8611", "everest": "8849"}
    if key not in table:
        raise ValueError(f"no entry for {key!r}")
    return table[key]


async def test_replan_gets_the_previous_plan_and_observations() -> None:
    rules = [
        ScriptRule(
            match=r"^Question:.*Plan 2:.*Observation: (\d+)\n.*Observation: ([\d.]+)\s*$",
            content="Thought: got it.\nAction: Finish(K2 is {groups[1]} m, {groups[2]} m less)",
        ),
        ScriptRule(
            match=r"^Question:.*no entry for 'K2'",
            content="Thought: the key is lower case.\nAction: Replan(use the key k2)",
        ),
        ScriptRule(
            match="The plan must change: use the key k2",
            content='3. lookup("k2")\n4. calculator("$1 - $3")\n5. join()',
        ),
        ScriptRule(match="Task:", content='1. lookup("everest")\n2. lookup("K2")\n3. join()'),
    ]
    backend = Recording(rules)
    result = await run(planner_graph([lookup, calculator]), backend)
    assert result.ok, result.error
    assert result.output.answer == "K2 is 8611 m, 238 m less"
    assert backend.ids() == ["plan1", "join1", "plan2", "join2"]
    replan = backend.requests[2].messages
    assert [m.role for m in replan] == ["system", "user", "assistant", "user"]
    assert replan[2].content == '1. lookup("everest")\n2. lookup("K2")\n3. join()'
    feedback = replan[3].content or ""
    assert '1. lookup("everest")\nObservation: 8849' in feedback
    assert "error: ValueError: no entry for 'K2'" in feedback
    assert "Number its actions from 3" in feedback
    assert "Plan 1:" in (backend.requests[3].messages[-1].content or "")
    ev = result.events
    assert first(ev, NodeFailed, "plan/task2", policy="observe")
    assert first(ev, NodeFinished, "plan/task4")


async def test_replans_are_bounded() -> None:
    backend = Recording(
        [
            ScriptRule(match="^Question:", content="Thought: no.\nAction: Replan(try again)"),
            ScriptRule(match="must change", content="9. join()"),
            ScriptRule(match="Task:", content='1. lookup("everest")\n2. join()'),
        ]
    )
    result = await run(planner_graph([lookup], max_replans=1), backend)
    assert not result.ok
    assert "after 1 replan(s) (max_replans=1)" in (result.error or "")
    assert "try again" in (result.error or "")
    assert backend.ids() == ["plan1", "join1", "plan2", "join2"]
    final_joiner = backend.requests[3].messages[0].content or ""
    assert "You cannot replan any more" in final_joiner


# -- malformed plans ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('2. nosuch("x")', "unknown tool 'nosuch'"),
        ("2. calculator(expression=5)", "invalid arguments: expression"),
        ('2. calculator("$9 + 1")', "$9 refers to a later task"),
        ('2. calculator("$7")', "$7 refers to a later task"),
        ("2. calculator($2)", "a cycle"),
        ("2. calculator(1 +)", "cannot parse the arguments"),
        ('2. calculator("1 +")', "error: "),  # the tool itself rejects it at run time
    ],
)
async def test_a_malformed_line_becomes_an_observation(bad_line: str, message: str) -> None:
    plan = f'1. calculator("1 + 1")\n{bad_line}\n3. calculator("$2 * 2")\n4. calculator("$1")\n'
    backend = Recording(
        [
            ScriptRule(match="^Question:", content="Thought: enough.\nAction: Finish(done)"),
            ScriptRule(match="Task:", content=plan + "5. join()"),
        ]
    )
    result = await run(planner_graph([calculator]), backend)
    assert result.ok, result.error
    joiner = backend.requests[-1].messages[-1].content or ""
    assert message in joiner
    ev = result.events
    assert first(ev, NodeFailed, "plan/task2", policy="observe")
    assert first(ev, NodeFinished, "plan/task4")  # unaffected tasks still ran
    if message == "error: ":
        assert first(ev, NodeSkipped, "plan/task3")  # it uses the failed task's result
    else:
        assert "plan/task3" not in {e.node for e in ev if isinstance(e, NodeStarted)}


async def test_an_unparsable_plan_with_no_replans_left_fails_clearly() -> None:
    backend = Recording(
        [
            ScriptRule(match="^Question:", content="Action: Replan(the plan was unusable)"),
            ScriptRule(match="Task:", content="I would search for it.\nsearch(x\n"),
        ]
    )
    result = await run(planner_graph([calculator], max_replans=0), backend)
    assert not result.ok
    assert "max_replans=0" in (result.error or "")
    joiner = backend.requests[-1].messages[-1].content or ""
    assert "a task line must start with its id" in joiner


# -- checkpoints and resume --------------------------------------------------------------

calls: dict[str, int] = {}
release = anyio.Event()


@tool
async def quick(x: str) -> str:
    """Counts its calls."""
    calls[x] = calls.get(x, 0) + 1
    return f"<{x}>"


@tool
async def blocked(x: str) -> str:
    """Waits for `release` (never set in the first run: the crash comes first)."""
    calls[x] = calls.get(x, 0) + 1
    await release.wait()
    return f"[{x}]"


RESUME_PLAN = (
    '1. quick("a")\n2. quick("b")\n3. blocked("c")\n4. quick("$1 $2 $3")\n5. join()<END_OF_PLAN>'
)


async def _crash_when(handle: Any, done: set[str]) -> None:
    """Cancel the run once every instance in `done` has finished (a simulated crash)."""
    async for e in handle.events():
        if isinstance(e, NodeFinished):
            done.discard(e.node)
        if not done:
            handle.cancel()
            return


class WatchedStore(MemoryStore):
    """A memory store that says when an output key has become durable."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.durable = anyio.Event()

    async def record(self, run_id: str, events: Any, outputs: Any = None) -> None:
        await super().record(run_id, events, outputs)
        if outputs and self.key in outputs:
            self.durable.set()


async def test_resume_after_a_crash_mid_plan_repeats_no_finished_task() -> None:
    global release
    calls.clear()
    release = anyio.Event()
    store = WatchedStore("plan/plan1")
    backend = Recording(
        [finish_with_last_observation(), ScriptRule(match="Task:", content=RESUME_PLAN)]
    )
    g = planner_graph([quick, blocked])
    runtime = Runtime(store=store, models={"default": backend})
    with anyio.fail_after(LIMIT_S):
        async with runtime.start(g, {"q": "go"}) as handle:
            await store.durable.wait()  # the plan has streamed and is checkpointed
            await _crash_when(handle, {"plan/task1", "plan/task2"})
            first_result = await handle.result()
    assert first_result.status == "cancelled"
    assert calls == {"a": 1, "b": 1, "c": 1}
    saved = await store.load_outputs(handle.run_id)
    assert {"plan/plan1", "plan/task1", "plan/task2"} <= set(saved)
    assert "plan/task3" not in saved

    release.set()
    with anyio.fail_after(LIMIT_S):
        result = await runtime.resume(handle.run_id, g)
    assert result.output.answer == "<<a> <b> [c]>"
    assert calls == {"a": 1, "b": 1, "c": 2, "<a> <b> [c]": 1}  # c was running: at least once
    assert backend.ids() == ["plan1", "join1"]  # the plan was not asked for again
    resumed = result.events
    assert "plan/task1" not in {e.node for e in resumed if isinstance(e, NodeStarted)}
    tasks = planned_tasks(await store.load_outputs(handle.run_id))
    assert [(t.idx, t.tool, t.deps) for t in tasks] == [
        (1, "quick", ()),
        (2, "quick", ()),
        (3, "blocked", ()),
        (4, "quick", ("plan/task1", "plan/task2", "plan/task3")),
    ]


class GatedStream(ScriptedBackend):
    """Streams the plan but stops after `stop_after` (until `gate` is set): a crash there
    leaves finished tasks whose plan text was never checkpointed."""

    def __init__(self, rules: list[ScriptRule], stop_after: str, gate: anyio.Event) -> None:
        super().__init__(rules)
        self.stop_after = stop_after
        self.gate = gate
        self.plans = 0

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        response = await self.generate(request)
        text = response.content or ""
        is_plan = (request.hints.request_id or "").endswith("plan1")
        self.plans += is_plan
        cut = text.index(self.stop_after) + len(self.stop_after) if is_plan else len(text)
        yield StreamChunk(delta=text[:cut])
        if cut < len(text):
            await self.gate.wait()
            yield StreamChunk(delta=text[cut:])
        yield StreamChunk(finish_reason="stop")


async def test_resume_after_a_crash_mid_stream_reuses_tasks_of_the_same_lines() -> None:
    calls.clear()
    store = MemoryStore()
    rules = [finish_with_last_observation(), ScriptRule(match="Task:", content=RESUME_PLAN)]
    gate = anyio.Event()
    backend = GatedStream(rules, stop_after='quick("b")\n', gate=gate)
    g = planner_graph([quick, blocked])
    runtime = Runtime(store=store, models={"default": backend})
    with anyio.fail_after(LIMIT_S):
        async with runtime.start(g, {"q": "go"}) as handle:
            await _crash_when(handle, {"plan/task1", "plan/task2"})
    assert "plan/plan1" not in await store.load_outputs(handle.run_id)
    gate.set()
    global release
    release = anyio.Event()
    release.set()
    with anyio.fail_after(LIMIT_S):
        result = await runtime.resume(handle.run_id, g)
    assert result.output.answer == "<<a> <b> [c]>"
    assert backend.plans == 2  # the plan had to be asked for again...
    assert calls["a"] == 1 and calls["b"] == 1  # ...but its finished tasks were not re-run


# -- concurrency limit of the node -------------------------------------------------------

active = {"now": 0, "max": 0}


@tool
async def busy(x: str) -> str:
    """Tracks how many calls run at once."""
    active["now"] += 1
    active["max"] = max(active["max"], active["now"])
    await anyio.sleep(0)
    await anyio.sleep(0)
    active["now"] -= 1
    return x


async def test_the_node_concurrency_policy_limits_tasks_in_flight() -> None:
    active.update(now=0, max=0)
    plan = "\n".join(f'{i}. busy("{i}")' for i in range(1, 6)) + "\n6. join()"
    backend = Recording([finish_with_last_observation(), ScriptRule(match="Task:", content=plan)])
    g = Graph("limited", inputs={"q": str})
    p = g.planner("plan", "Task: {q}", tools=[busy], inputs={"q": g.input.q}, concurrency=2)
    g.output(answer=p.out)
    result = await run(g, backend)
    assert result.output.answer == "5"
    assert active["max"] == 2
