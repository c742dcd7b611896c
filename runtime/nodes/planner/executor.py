"""The `planner` node: LLMCompiler-style parallel function calling inside a run.

The planner LLM streams a plan (`1. search("x")`, `2. calculator("$1 * 2")`, `3. join()`);
`PlanParser` turns the stream into tasks as their lines complete, and each task starts the
moment its line is complete and the tasks it refers to are done: every task waits on its
dependencies' completion events (anyio), so there is no polling interval anywhere. When the
plan has streamed and its tasks have settled, the joiner (an LLM call given the plan and its
observations) answers — the answer is parsed into the node's `output` type — or asks for a
new plan, at most `max_replans` times; a new plan sees the earlier plans and observations.

Each task is a node instance `{planner}/task{N}` of the run's DAG: the planner emits
`GraphExtended` for it, then `NodeStarted`, `ToolCallStarted`/`ToolCallFinished` and
`NodeFinished` (or `NodeFailed` with policy "observe": the error goes to the joiner as an
observation, and tasks that use its result are `NodeSkipped`). Progress is checkpointed
in the journal: the plan text (`{planner}/plan{R}`), every settled task
(`{planner}/task{N}`) and every joiner decision (`{planner}/join{R}`). A resumed run reuses
the plan instead of asking the model again, and does not repeat a finished task (a task
checkpoint is reused only for the same call on the same line, so a plan that was cut off
mid-stream and asked for again cannot pick up a stale result).

Backends that stream (`StreamingBackend` with `capabilities.streaming`) are streamed; for
the others the whole plan is parsed when the response arrives.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from treadle.backends.base import (
    LLMRequest,
    LLMResponse,
    Message,
    SchedulingHints,
)
from treadle.graphs.compiled import LLMFacts
from treadle.graphs.kinds import PlannerNode
from treadle.runtime.core.errors import NodeError, OutputError
from treadle.runtime.core.events import (
    GraphExtended,
    NodeFailed,
    NodeFinished,
    NodeSkipped,
    NodeStarted,
)
from treadle.runtime.core.gateway import call_llm
from treadle.runtime.core.values import adapter, as_text
from treadle.runtime.nodes.base import NodeCall, NodeExecutor
from treadle.runtime.nodes.llm import output_schema, parse_output
from treadle.runtime.nodes.planner.parser import (
    ArgumentResolutionError,
    Join,
    PlanError,
    PlanItem,
    PlanParser,
    Task,
    Thought,
    resolve_args,
)
from treadle.runtime.nodes.planner.prompts import (
    REPLAN_MESSAGE,
    ScratchEntry,
    joiner_system,
    joiner_user,
    parse_joiner,
    planner_system,
    scratchpad,
)
from treadle.runtime.nodes.tool import call_tool
from treadle.tools import Tool, ToolError

if TYPE_CHECKING:
    from treadle.runtime.core.context import RunContext

#: `NodeFailed.policy` of a task whose error was handed to the joiner
OBSERVE = "observe"


async def run_planner_node(
    ctx: RunContext,
    spec: PlannerNode,
    facts: LLMFacts | None,
    iid: str,
    inputs: dict[str, Any],
) -> Any:
    """Run a `planner` node to its final, parsed answer."""
    return await PlannerRun(ctx, spec, facts, iid, inputs).run()


class PlannerExecutor(NodeExecutor[PlannerNode]):
    spec = PlannerNode

    async def run(self, call: NodeCall[PlannerNode]) -> Any:
        return await run_planner_node(
            call.ctx, call.spec, call.llm_facts, call.instance, call.inputs
        )


EXECUTOR = PlannerExecutor()


# -- checkpoints ------------------------------------------------------------------------


def plan_key(iid: str, round_: int) -> str:
    return f"{iid}/plan{round_}"


def task_key(iid: str, idx: int) -> str:
    return f"{iid}/task{idx}"


def join_key(iid: str, round_: int) -> str:
    return f"{iid}/join{round_}"


@dataclass(frozen=True)
class PlannedTask:
    """A task of a finished or interrupted plan, as its checkpoint records it."""

    planner: str
    instance: str
    idx: int
    tool: str
    line: str
    deps: tuple[str, ...]
    ok: bool


_TASK_KEY = re.compile(r"(.+)/task(\d+)")


def planned_tasks(outputs: Mapping[str, bytes]) -> list[PlannedTask]:
    """The planner tasks recorded in a run's checkpoints (`StateStore.load_outputs`), with
    their dependencies as instance ids: the DAG extension a planner made, for drawing."""
    found: list[PlannedTask] = []
    for key, data in outputs.items():
        m = _TASK_KEY.fullmatch(key)
        if m is None:
            continue
        try:
            record = json.loads(data)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("kind") != "planner_task":
            continue
        planner = m.group(1)
        found.append(
            PlannedTask(
                planner=planner,
                instance=key,
                idx=int(m.group(2)),
                tool=str(record.get("tool", "")),
                line=str(record.get("line", "")),
                deps=tuple(task_key(planner, int(d)) for d in record.get("deps", [])),
                ok=bool(record.get("ok")),
            )
        )
    found.sort(key=lambda t: (t.planner, t.idx))
    return found


# -- execution --------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    ok: bool
    #: the tool's result (typed as the tool returns it) when ok
    value: Any
    #: what the joiner reads
    observation: str


@dataclass
class _Running:
    task: Task
    iid: str
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Round:
    number: int
    text: str = ""
    #: the plan's lines in order: thoughts, tasks (by id) and problems
    entries: list[tuple[str, Any]] = field(default_factory=list)


class PlannerRun:
    """One execution of a planner node (all its rounds)."""

    def __init__(
        self,
        ctx: RunContext,
        spec: PlannerNode,
        facts: LLMFacts | None,
        iid: str,
        inputs: dict[str, Any],
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.facts = facts
        self.iid = iid
        text = {k: as_text(v) for k, v in inputs.items()}
        self.question = spec.prompt.format(**text)
        system = spec.system.format(**text) if spec.system else None
        self.tools: dict[str, Tool] = {t.name: t for t in spec.tools}
        self.system = planner_system(tuple(spec.tools), system)
        self.outcomes: dict[int, TaskOutcome] = {}
        self.lines: dict[int, str] = {}
        self.rounds: list[_Round] = []
        self.running: dict[int, _Running] = {}
        self.messages: list[Message] = [
            Message(role="system", content=self.system),
            Message(role="user", content=self.question),
        ]
        self.limiter = (
            anyio.CapacityLimiter(spec.options.concurrency) if spec.options.concurrency else None
        )
        self._schema = output_schema(spec.output)

    async def run(self) -> Any:
        spec = self.spec
        for number in range(1, spec.max_replans + 2):
            current = _Round(number)
            self.rounds.append(current)
            await self._plan_and_execute(current)
            decision_text = await self._join_text(current)
            decision = parse_joiner(decision_text)
            if decision.action == "finish":
                return await self._answer(decision.text, decision_text)
            if number > spec.max_replans:
                raise NodeError(
                    self.iid,
                    f"the joiner asked for a new plan after {spec.max_replans} replan(s) "
                    f"(max_replans={spec.max_replans}); its reason: {decision.text or '(none)'}",
                    retryable=False,
                )
            next_id = max([*self.outcomes, *self.lines, 0]) + 1
            self.messages.append(Message(role="assistant", content=current.text))
            self.messages.append(
                Message(
                    role="user",
                    content=REPLAN_MESSAGE.format(
                        scratchpad=self._scratchpad(current),
                        reason=decision.text or "(no reason given)",
                        next_id=next_id,
                    ),
                )
            )
        raise AssertionError("unreachable: the loop returns or raises")

    # -- planning ------------------------------------------------------------------------

    async def _plan_and_execute(self, current: _Round) -> None:
        ctx = self.ctx
        key = plan_key(self.iid, current.number)
        parser = PlanParser(
            self.tools,
            known=self.outcomes.keys() | self.lines.keys(),
            invalid=[i for i, o in self.outcomes.items() if not o.ok and i not in self.lines],
        )
        saved = ctx.restored.get(key)
        async with anyio.create_task_group() as tg:

            def accept(items: list[PlanItem]) -> bool:
                started = False
                for item in items:
                    started |= self._accept(item, current, tg)
                return started

            if saved is not None:
                current.text = str(json.loads(saved)["text"])
                accept(parser.parse_all(current.text))
            else:
                current.text = await self._stream_plan(current.number, parser, accept)
                accept(parser.finish())
                data = json.dumps(
                    {"kind": "planner_plan", "round": current.number, "text": current.text}
                ).encode()
                await ctx.journal.commit(key, data)
                ctx.restored[key] = data
        if parser.ignored:
            current.entries.append(
                ("problem", f"text after join() was ignored: {' '.join(parser.ignored)[:200]}")
            )

    def _accept(self, item: PlanItem, current: _Round, tg: TaskGroup) -> bool:
        """Record a parsed item; start a task for a `Task`. True when a task was started."""
        if isinstance(item, Task):
            state = _Running(item, task_key(self.iid, item.idx))
            self.running[item.idx] = state
            self.lines[item.idx] = item.line
            current.entries.append(("task", item.idx))
            self.ctx.emit(GraphExtended, node=self.iid, instances=[state.iid])
            tg.start_soon(self._run_task, state, name=state.iid)
            return True
        if isinstance(item, PlanError):
            if item.idx is None:
                current.entries.append(("problem", str(item)))
                return False
            # an invalid line still takes its id: the joiner sees why it did not run
            inst = task_key(self.iid, item.idx)
            self.outcomes[item.idx] = TaskOutcome(False, None, f"error: not run: {item.message}")
            current.entries.append(("invalid", (item.idx, item.line.strip())))
            self.ctx.emit(GraphExtended, node=self.iid, instances=[inst])
            self.ctx.emit(NodeFailed, node=inst, error=item.message, policy=OBSERVE)
            return False
        if isinstance(item, Thought):
            current.entries.append(("thought", item.text))
        elif isinstance(item, Join):
            pass  # the joiner runs once the plan has streamed and its tasks have settled
        return False

    async def _stream_plan(
        self, number: int, parser: PlanParser, accept: Callable[[list[PlanItem]], bool]
    ) -> str:
        spec, ctx = self.spec, self.ctx
        request = LLMRequest(
            model=spec.model,
            messages=list(self.messages),
            hints=SchedulingHints(
                program_id=ctx.run_id,
                request_id=f"{ctx.run_id}:{self.iid}:plan{number}",
                tenant=ctx.options.tenant,
                next_tool=next(iter(self.tools), None),
                is_last_step=False,
            ),
        )

        async def feed(delta: str) -> bool:
            if accept(parser.feed(delta)):
                # let the tasks just dispatched start before the next token is read
                await anyio.lowlevel.checkpoint()
            # the plan ends at join(): what the model would still write is not needed
            return parser.joined

        await call_llm(ctx, self.iid, spec.model, request, on_text=feed)
        return parser.text

    # -- tasks ---------------------------------------------------------------------------

    async def _run_task(self, state: _Running) -> None:
        task, ctx = state.task, self.ctx
        try:
            for dep in task.deps:
                running = self.running.get(dep)
                if running is not None and not running.done.is_set():
                    await running.done.wait()
            failed = [d for d in task.deps if not self.outcomes[d].ok]
            if failed:
                reason = f"not run: it uses the result of task {failed[0]}, which failed"
                self.outcomes[task.idx] = TaskOutcome(False, None, f"error: {reason}")
                ctx.emit(NodeSkipped, node=state.iid, reason=reason)
                return
            saved = ctx.restored.get(state.iid)
            if saved is not None:
                outcome = self._restore(task, saved)
                if outcome is not None:
                    self.outcomes[task.idx] = outcome
                    return
            if self.limiter is not None:
                async with self.limiter:
                    outcome = await self._invoke(task, state.iid)
            else:
                outcome = await self._invoke(task, state.iid)
            self.outcomes[task.idx] = outcome
        finally:
            state.done.set()

    async def _invoke(self, task: Task, inst: str) -> TaskOutcome:
        ctx = self.ctx
        tool = self.tools[task.tool]
        ctx.emit(NodeStarted, node=inst, attempt=1)
        started = time.perf_counter()
        call_id = f"{inst}@1"
        try:
            # every dependency succeeded (a task whose input failed is skipped, not run)
            results = {d: self.outcomes[d].value for d in task.deps}
            args = resolve_args(task, results, tool.parameters_schema)
        except ArgumentResolutionError as exc:
            outcome = TaskOutcome(False, None, f"error: {exc}")
        else:
            try:
                value = await call_tool(ctx, tool, inst, call_id, args, key=f"{ctx.run_id}:{inst}")
            except ToolError as exc:
                outcome = TaskOutcome(False, None, f"error: {exc.reason}")
            else:
                outcome = TaskOutcome(True, value, as_text(value))
        try:
            data = self._record(task, tool, outcome)
        except ValueError as exc:
            outcome = TaskOutcome(False, None, f"error: {exc}")
            data = self._record(task, tool, outcome)
        if outcome.ok:
            ctx.emit(NodeFinished, node=inst, duration_s=time.perf_counter() - started)
        else:
            ctx.emit(NodeFailed, node=inst, error=outcome.observation, policy=OBSERVE)
        await ctx.journal.commit(inst, data)
        ctx.restored[inst] = data
        return outcome

    def _record(self, task: Task, tool: Tool, outcome: TaskOutcome) -> bytes:
        value: Any = None
        if outcome.ok:
            try:
                value = adapter(tool.output_type).dump_python(
                    outcome.value, mode="json", warnings="error"
                )
            except Exception as exc:
                raise ValueError(
                    f"the result of {tool.name} ({type(outcome.value).__name__}) cannot be "
                    f"checkpointed: {exc}"
                ) from None
        record = {
            "kind": "planner_task",
            "tool": task.tool,
            "line": task.line,
            "deps": list(task.deps),
            "ok": outcome.ok,
            "observation": outcome.observation,
            "value": value,
        }
        return json.dumps(record).encode()

    def _restore(self, task: Task, data: bytes) -> TaskOutcome | None:
        record = json.loads(data)
        if record.get("tool") != task.tool or record.get("line") != task.line:
            return None  # another plan used this id before the crash: run this task
        if not record.get("ok"):
            return TaskOutcome(False, None, str(record.get("observation", "error")))
        tool = self.tools[task.tool]
        value = adapter(tool.output_type).validate_python(record.get("value"))
        return TaskOutcome(True, value, str(record.get("observation", "")))

    # -- joining -------------------------------------------------------------------------

    def _scratchpad(self, current: _Round) -> str:
        entries: list[ScratchEntry] = []
        for kind, payload in current.entries:
            if kind == "thought":
                entries.append(ScratchEntry("thought", payload))
            elif kind == "problem":
                entries.append(ScratchEntry("problem", payload))
            elif kind == "invalid":
                idx, line = payload
                entries.append(ScratchEntry("task", line, self.outcomes[idx].observation))
            else:
                outcome = self.outcomes.get(payload)
                observation = outcome.observation if outcome is not None else "error: not run"
                entries.append(
                    ScratchEntry("task", f"{payload}. {self.lines[payload]}", observation)
                )
        return scratchpad(entries)

    def _joiner_messages(self, number: int) -> list[Message]:
        can_replan = number <= self.spec.max_replans
        return [
            Message(
                role="system",
                content=joiner_system(self.spec.joiner, self._schema, can_replan),
            ),
            Message(
                role="user",
                content=joiner_user(self.question, [self._scratchpad(r) for r in self.rounds]),
            ),
        ]

    async def _join_text(self, current: _Round) -> str:
        key = join_key(self.iid, current.number)
        saved = self.ctx.restored.get(key)
        if saved is not None:
            return str(json.loads(saved)["text"])
        response = await self._call_joiner(current.number, self._joiner_messages(current.number))
        text = response.content or ""
        data = json.dumps({"kind": "planner_join", "round": current.number, "text": text}).encode()
        await self.ctx.journal.commit(key, data)
        self.ctx.restored[key] = data
        return text

    async def _call_joiner(self, number: int, messages: list[Message]) -> LLMResponse:
        ctx, spec = self.ctx, self.spec
        last = (
            self.facts is not None
            and self.facts.is_last_llm_step
            and number > self.spec.max_replans
        )
        request = LLMRequest(
            model=spec.model,
            messages=list(messages),
            hints=SchedulingHints(
                program_id=ctx.run_id,
                request_id=f"{ctx.run_id}:{self.iid}:join{number}",
                tenant=ctx.options.tenant,
                is_last_step=last,
            ),
        )
        return await call_llm(ctx, self.iid, spec.model, request)

    async def _answer(self, answer: str, raw: str) -> Any:
        try:
            return parse_output(self.spec.output, answer, self.iid)
        except OutputError as exc:
            # one repair: tell the joiner what was wrong with its answer
            number = len(self.rounds)
            messages = [
                *self._joiner_messages(number),
                Message(role="assistant", content=raw),
                Message(
                    role="user",
                    content=f"That answer was invalid ({exc.reason}). Answer again with "
                    "Action: Finish(<only a JSON object that matches the schema>).",
                ),
            ]
            response = await self._call_joiner(number, messages)
            decision = parse_joiner(response.content or "")
            if decision.action != "finish":
                raise
            return parse_output(self.spec.output, decision.text, self.iid)
