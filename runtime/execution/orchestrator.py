"""The event-driven orchestrator: executes one compiled graph (a run, or a subgraph in it).

There are no supersteps. When a node finishes, each successor whose inputs are all settled
becomes ready at once and starts, whatever its siblings are doing. The task that finishes
a node goes on with one ready successor itself (a chain never spawns a task per node) and
starts tasks for the others; quick synchronous functions run inline in that task.
"""

from __future__ import annotations

import inspect
import random
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup

from treadle.graphs.builder import route_label
from treadle.graphs.compile import CompiledGraph, CompiledNode
from treadle.graphs.spec import (
    BranchNode,
    FirstOf,
    FuncNode,
    LLMNode,
    MapNode,
    NodeSpec,
    PlannerNode,
    Ref,
    SubgraphNode,
    ToolNode,
)
from treadle.runtime.core.context import RunContext
from treadle.runtime.core.errors import NodeError, OutputError, RunFailed
from treadle.runtime.core.events import (
    GraphExtended,
    NodeFailed,
    NodeFinished,
    NodeReady,
    NodeRetrying,
    NodeSkipped,
    NodeStarted,
)
from treadle.runtime.core.values import Getter, adapter, dump_value, load_value, make_getter
from treadle.runtime.nodes.llm import run_llm_node, run_tool_node

#: an inline chain yields to the event loop this often, so it can be cancelled
_YIELD_EVERY = 64
#: at most this many inline outputs wait for one commit
_STAGE_LIMIT = 512


class _Skip:
    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class NodePlan:
    """A node prepared for execution (built once per compiled graph)."""

    cn: CompiledNode
    getters: list[tuple[str, Getter]]
    #: nodes whose skipping skips this node (direct references, not inside first_of)
    hard_deps: tuple[str, ...]
    #: first_of groups: this node is skipped only if every node of a group is
    soft_groups: tuple[tuple[str, ...], ...]
    inline: bool
    inner: NodePlan | None = None
    over: Getter | None = None

    def dump(self, value: Any) -> bytes:
        """The output as JSON for the journal (ValueError if it cannot be serialized)."""
        try:
            return self._dump_json(value, warnings="error")
        except Exception:
            return dump_value(self.cn.output_type, value)

    def __post_init__(self) -> None:
        # the core serializer itself: this runs once per node, on the hot path
        self._dump_json = adapter(self.cn.output_type).serializer.to_json

    @property
    def id(self) -> str:
        return self.cn.id

    @property
    def spec(self) -> NodeSpec:
        return self.cn.spec


def _plan(cn: CompiledNode) -> NodePlan:
    spec = cn.spec
    getters: list[tuple[str, Getter]] = []
    hard: list[str] = []
    soft: list[tuple[str, ...]] = []
    for name, binding in spec.inputs.items():
        get, nodes = make_getter(binding)
        getters.append((name, get))
        if isinstance(binding, FirstOf):
            soft.append(nodes)
        elif isinstance(binding, Ref):
            hard.extend(nodes)
    inner = over = None
    if isinstance(spec, MapNode) and cn.inner is not None:
        over, nodes = make_getter(spec.over)
        hard.extend(nodes)
        inner = _plan(cn.inner)
        hard.extend(inner.hard_deps)
        soft.extend(inner.soft_groups)
    p = spec.policy
    inline = (
        isinstance(spec, FuncNode)
        and not spec.blocking
        and not inspect.iscoroutinefunction(spec.fn)
        and p.timeout_s is None
        and p.retries == 0
    ) or (isinstance(spec, BranchNode) and p.timeout_s is None and p.retries == 0)
    return NodePlan(cn, getters, tuple(dict.fromkeys(hard)), tuple(soft), inline, inner, over)


def plans_for(cg: CompiledGraph) -> dict[str, NodePlan]:
    cached = cg.__dict__.get("_plans")
    if cached is None:
        cached = {nid: _plan(cn) for nid, cn in cg.nodes.items()}
        cg.__dict__["_plans"] = cached
    return cached


class GraphScope:
    """Executes one compiled graph with given inputs inside a run."""

    def __init__(
        self, ctx: RunContext, cg: CompiledGraph, inputs: dict[str, Any], prefix: str = ""
    ):
        self.ctx = ctx
        self.cg = cg
        self.inputs = inputs
        self.prefix = prefix
        self.plans = plans_for(cg)
        self.values: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.remaining = {nid: len(cn.deps) for nid, cn in cg.nodes.items()}
        self.ready: deque[str] = deque()
        self._tg: TaskGroup | None = None
        self._inline_count = 0

    # -- driving -----------------------------------------------------------------------

    async def run(self) -> Any:
        for nid, count in self.remaining.items():
            if count == 0:
                self._became_ready(nid)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._dispatch(None)
        return self._output()

    def _dispatch(self, local: deque[str] | None) -> None:
        """Hand out ready nodes: quick inline ones (and one other) stay with the caller's
        task via `local`; the rest get tasks of their own."""
        if not self.ready:
            return
        assert self._tg is not None
        plans = self.plans
        keep_one = local is not None and all(plans[n].inline for n in local)
        while self.ready:
            nid = self.ready.popleft()
            inline = plans[nid].inline
            if local is not None and (inline or keep_one):
                keep_one = keep_one and inline
                local.append(nid)
            else:
                self._tg.start_soon(self._drive, nid, name=f"node {self.prefix}{nid}")

    async def _drive(self, first: str) -> None:
        local: deque[str] = deque([first])
        # outputs of inline nodes run back to back, made durable in one commit before any
        # of their successors may start
        staged: list[tuple[str, Any]] = []
        while local:
            nid = local.popleft()
            done = await self._execute(nid)
            if done is not None:
                staged.append(done)
            if staged and (
                not local or not self.plans[local[0]].inline or len(staged) >= _STAGE_LIMIT
            ):
                await self.ctx.journal.commit()
                for sid, value in staged:
                    self.values[sid] = value
                    self._settled(sid)
                staged.clear()
            self._dispatch(local)

    def _became_ready(self, nid: str) -> None:
        plan = self.plans[nid]
        reason = self._skip_reason(plan)
        if reason is not None:
            self._mark_skipped(nid, reason)
            return
        self.ctx.emit(NodeReady, self.prefix + nid)
        self.ready.append(nid)

    def _skip_reason(self, plan: NodePlan) -> str | None:
        for branch, labels in plan.cn.guards:
            if branch in self.skipped:
                return f"branch {branch!r} was skipped"
            if self.values.get(branch) not in labels:
                return f"branch {branch!r} chose {self.values.get(branch)!r}"
        if not self.skipped:  # the common case: no input can be missing
            return None
        for dep in plan.hard_deps:
            if dep in self.skipped:
                return f"input from skipped node {dep!r}"
        for group in plan.soft_groups:
            if all(n in self.skipped for n in group):
                return "every alternative of first_of was skipped"
        return None

    def _settled(self, nid: str) -> None:
        for child in self.plans[nid].cn.dependents:
            left = self.remaining[child] - 1
            self.remaining[child] = left
            if left == 0:
                self._became_ready(child)

    def _mark_skipped(self, nid: str, reason: str) -> None:
        self.skipped[nid] = reason
        self.ctx.emit(NodeSkipped, node=self.prefix + nid, reason=reason)
        self._settled(nid)

    # -- one node ----------------------------------------------------------------------

    async def _execute(self, nid: str) -> tuple[str, Any] | None:
        """Run a node. An inline node's output is staged in the journal and returned for the
        caller to settle after a commit; any other node is committed and settled here."""
        plan = self.plans[nid]
        iid = self.prefix + nid
        data = self.ctx.restored.get(iid)
        if data is not None:
            self.values[nid] = load_value(plan.cn.output_type, data)
            self._settled(nid)
            return None
        values, inputs = self.values, self.inputs
        kwargs = {name: get(values, inputs, None) for name, get in plan.getters}
        if plan.inline:
            result = self._run_inline(plan, iid, kwargs)
            self._inline_count += 1
            if self._inline_count % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        else:
            result = await self._run_with_policy(plan, iid, kwargs)
        if isinstance(result, _Skip):
            self._mark_skipped(nid, result.reason)
            return None
        value, data_out, started = result
        self.ctx.emit(NodeFinished, iid, time.perf_counter() - started)
        if plan.inline:
            self.ctx.journal.stage(iid, data_out)
            return nid, value
        await self.ctx.journal.commit(iid, data_out)
        self.values[nid] = value
        self._settled(nid)
        return None

    def _run_inline(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any]
    ) -> tuple[Any, bytes, float] | _Skip:
        self.ctx.emit(NodeStarted, iid, 1)
        started = time.perf_counter()
        try:
            if isinstance(plan.spec, FuncNode):
                value = plan.spec.fn(**kwargs)
            else:
                value = self._route(plan, kwargs)
            return value, plan.dump(value), started
        except Exception as exc:
            return self._on_final_error(plan, iid, _describe(exc), 1, started)

    async def _run_with_policy(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any]
    ) -> tuple[Any, bytes, float] | _Skip:
        policy = plan.spec.policy
        attempt = 1
        while True:
            self.ctx.emit(NodeStarted, node=iid, attempt=attempt)
            started = time.perf_counter()
            try:
                if self.ctx.limiter is not None and not isinstance(plan.spec, MapNode):
                    async with self.ctx.limiter:
                        value = await self._attempt(plan, iid, kwargs, attempt, policy.timeout_s)
                else:
                    value = await self._attempt(plan, iid, kwargs, attempt, policy.timeout_s)
                try:
                    return value, plan.dump(value), started
                except ValueError as exc:
                    raise OutputError(iid, str(exc), retryable=False) from None
            except Exception as exc:
                message = _describe(exc)
                retryable = getattr(exc, "retryable", True)
                if attempt <= policy.retries and retryable:
                    delay = _backoff(policy.backoff_s, policy.backoff_max_s, policy.jitter, attempt)
                    self.ctx.emit(
                        NodeRetrying, node=iid, attempt=attempt, error=message, delay_s=delay
                    )
                    await anyio.sleep(delay)
                    attempt += 1
                    continue
                return self._on_final_error(plan, iid, message, attempt, started)

    def _on_final_error(
        self, plan: NodePlan, iid: str, message: str, attempt: int, started: float
    ) -> tuple[Any, bytes, float] | _Skip:
        """What the node's error policy makes of its last failure: a skip, the fallback as
        its output, or the end of the run (`RunFailed`)."""
        policy = plan.spec.policy
        self.ctx.emit(NodeFailed, node=iid, error=message, attempt=attempt, policy=policy.on_error)
        if policy.on_error == "skip":
            return _Skip(f"failed: {message}")
        if policy.on_error == "fallback":
            return policy.fallback, plan.dump(policy.fallback), started
        raise RunFailed.at_node(self.ctx.run_id, iid, message)

    async def _attempt(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any], attempt: int, timeout: float | None
    ) -> Any:
        try:
            with anyio.fail_after(timeout):
                return await self._invoke(plan, iid, kwargs, attempt)
        except TimeoutError:
            raise NodeError(iid, f"timed out after {timeout} s") from None

    async def _invoke(self, plan: NodePlan, iid: str, kwargs: dict[str, Any], attempt: int) -> Any:
        spec = plan.spec
        if isinstance(spec, FuncNode):
            if inspect.iscoroutinefunction(spec.fn):
                return await spec.fn(**kwargs)
            if spec.blocking:
                # on cancellation the thread is left to finish on its own: the node is not
                # recorded, so it runs again on resume (at-least-once), and Ctrl-C is prompt
                return await anyio.to_thread.run_sync(
                    partial(spec.fn, **kwargs), abandon_on_cancel=True
                )
            return spec.fn(**kwargs)
        if isinstance(spec, LLMNode):
            return await run_llm_node(self.ctx, spec, self.cg.facts.llm.get(plan.id), iid, kwargs)
        if isinstance(spec, ToolNode):
            assert spec.tool is not None
            return await run_tool_node(self.ctx, spec.tool, iid, kwargs, attempt)
        if isinstance(spec, BranchNode):
            return self._route(plan, kwargs)
        if isinstance(spec, MapNode):
            return await self._run_map(plan, iid)
        if isinstance(spec, PlannerNode):
            from treadle.runtime.nodes.planner.executor import run_planner_node

            return await run_planner_node(
                self.ctx, spec, self.cg.facts.llm.get(plan.id), iid, kwargs
            )
        if isinstance(spec, SubgraphNode):
            assert plan.cn.child is not None
            return await GraphScope(self.ctx, plan.cn.child, kwargs, f"{iid}/").run()
        raise NodeError(iid, f"cannot execute a {spec.kind} node", retryable=False)

    def _route(self, plan: NodePlan, kwargs: dict[str, Any]) -> str:
        spec = plan.spec
        assert isinstance(spec, BranchNode)
        raw = spec.route(**kwargs) if spec.route is not None else next(iter(kwargs.values()))
        label = route_label(raw)
        if label not in spec.routes and spec.default is not None:
            return spec.default
        return label

    # -- map -----------------------------------------------------------------------------

    async def _run_map(self, plan: NodePlan, iid: str) -> Any:
        spec = plan.spec
        assert isinstance(spec, MapNode) and plan.inner is not None and plan.over is not None
        items = list(plan.over(self.values, self.inputs, None))
        instances = [f"{iid}[{i}]" for i in range(len(items))]
        self.ctx.emit(GraphExtended, node=iid, instances=instances)
        results: list[Any] = [None] * len(items)
        skipped: set[int] = set()
        inner = plan.inner
        limiter = (
            anyio.CapacityLimiter(spec.policy.concurrency) if spec.policy.concurrency else None
        )

        async def one(i: int) -> None:
            inst = instances[i]
            data = self.ctx.restored.get(inst)
            if data is not None:
                results[i] = load_value(inner.cn.output_type, data)
                return
            kwargs = {name: get(self.values, self.inputs, items[i]) for name, get in inner.getters}
            if limiter is not None:
                async with limiter:
                    outcome = await self._run_instance(inner, inst, kwargs)
            else:
                outcome = await self._run_instance(inner, inst, kwargs)
            if isinstance(outcome, _Skip):
                skipped.add(i)
            else:
                results[i] = outcome

        if inner.inline:
            for i in range(len(items)):
                await one(i)
        else:
            async with anyio.create_task_group() as tg:
                for i in range(len(items)):
                    tg.start_soon(one, i, name=instances[i])
        collected = [r for i, r in enumerate(results) if i not in skipped]
        if spec.reduce is None:
            return collected
        reduced = spec.reduce(collected)
        return await reduced if inspect.isawaitable(reduced) else reduced

    async def _run_instance(self, plan: NodePlan, inst: str, kwargs: dict[str, Any]) -> Any:
        if plan.inline:
            result = self._run_inline(plan, inst, kwargs)
        else:
            result = await self._run_with_policy(plan, inst, kwargs)
        if isinstance(result, _Skip):
            self.ctx.emit(NodeSkipped, node=inst, reason=result.reason)
            return result
        value, data, started = result
        self.ctx.emit(NodeFinished, node=inst, duration_s=time.perf_counter() - started)
        await self.ctx.journal.commit(inst, data)
        # a retry of the whole map then reuses the elements that already finished
        self.ctx.restored[inst] = data
        return value

    # -- result --------------------------------------------------------------------------

    def _output(self) -> Any:
        model = self.cg.output_type
        if not self.cg.spec.outputs:
            return model.model_validate(
                {n.id: self.values.get(n.id) for n in self.cg.nodes.values() if not n.dependents}
            )
        out: dict[str, Any] = {}
        for name, binding in self.cg.spec.outputs.items():
            get, nodes = make_getter(binding)
            if nodes and not any(n in self.values for n in nodes):
                why = "; ".join(self.skipped.get(n, "did not run") for n in nodes)
                raise RunFailed.at_node(
                    self.ctx.run_id,
                    self.prefix + nodes[0],
                    f"output {name!r} is unavailable: {why}",
                )
            out[name] = get(self.values, self.inputs, None)
        return model.model_validate(out)


def _backoff(base: float, cap: float, jitter: float, attempt: int) -> float:
    delay = min(cap, base * 2 ** (attempt - 1))
    return delay * (1 - jitter * random.random())


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, RunFailed) and exc.node is not None:
        return f"{exc.node}: {exc.reason}"
    if isinstance(exc, NodeError):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
