"""The event-driven orchestrator: executes one compiled graph (a run, or a subgraph in it).

There are no supersteps. When a node finishes, each successor whose inputs are all settled
becomes ready at once and starts, whatever its siblings are doing. The task that finishes
a node goes on with one ready successor itself (a chain never spawns a task per node) and
starts tasks for the others; quick synchronous functions run inline in that task.

The orchestrator knows no node kind: it resolves inputs, applies a node's options
(retries with backoff through tenacity, timeout, error policy, the run's concurrency
limit), journals outputs, and leaves the running itself to the kind's executor
(`treadle.runtime.nodes`).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential

from treadle.graphs.compiled import CompiledGraph, CompiledNode
from treadle.graphs.kinds import kind_of
from treadle.graphs.spec import FirstOf, NodeOptions, NodeSpec, Ref
from treadle.runtime.core.context import RunContext
from treadle.runtime.core.errors import NodeError, OutputError, RunFailed
from treadle.runtime.core.events import (
    NodeFailed,
    NodeFinished,
    NodeReady,
    NodeRetrying,
    NodeSkipped,
    NodeStarted,
)
from treadle.runtime.core.values import Getter, adapter, dump_value, load_value, make_getter
from treadle.runtime.nodes.base import NodeCall, NodeExecutor, Skipped
from treadle.runtime.nodes.registry import executor_for

#: an inline chain yields to the event loop this often, so it can be cancelled
_YIELD_EVERY = 64
#: at most this many inline outputs wait for one commit
_STAGE_LIMIT = 512


@dataclass
class NodePlan:
    """A node prepared for execution (built once per compiled graph)."""

    cn: CompiledNode
    getters: list[tuple[str, Getter]]
    #: nodes whose skipping skips this node (direct references, not inside first_of)
    hard_deps: tuple[str, ...]
    #: first_of groups: this node is skipped only if every node of a group is
    soft_groups: tuple[tuple[str, ...], ...]
    executor: NodeExecutor[Any]
    #: the synchronous `(**inputs) -> output` of a node that runs inline (None: it does not)
    run_inline: Callable[..., Any] | None
    inner: NodePlan | None = None

    @property
    def inline(self) -> bool:
        return self.run_inline is not None

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
    getters = [(name, make_getter(binding)[0]) for name, binding in spec.inputs.items()]
    hard: list[str] = []
    soft: list[tuple[str, ...]] = []
    # every reference the node reads (a map's `over` and its inner node's included): a
    # skipped node it refers to directly skips it; a first_of only if all are skipped
    for _, binding in kind_of(spec).bindings(spec):
        if isinstance(binding, FirstOf):
            soft.append(make_getter(binding)[1])
        elif isinstance(binding, Ref):
            hard.extend(make_getter(binding)[1])
    executor = executor_for(spec)
    options = spec.options
    run_inline = (
        executor.inline(spec) if options.timeout_s is None and options.retries == 0 else None
    )
    inner = _plan(cn.inner) if cn.inner is not None else None
    return NodePlan(
        cn, getters, tuple(dict.fromkeys(hard)), tuple(soft), executor, run_inline, inner
    )


def plans_for(cg: CompiledGraph) -> dict[str, NodePlan]:
    cached = cg.__dict__.get("_plans")
    if cached is None:
        cached = {nid: _plan(cn) for nid, cn in cg.nodes.items()}
        cg.__dict__["_plans"] = cached
    return cached


def _nested_plans(cg: CompiledGraph) -> dict[int, NodePlan]:
    """The plans of nodes that other nodes run (a map's inner node, and so on down), by
    the id of their `CompiledNode`."""
    cached = cg.__dict__.get("_nested_plans")
    if cached is None:
        cached = {}
        todo = [p.inner for p in plans_for(cg).values()]
        while todo:
            plan = todo.pop()
            if plan is not None:
                cached[id(plan.cn)] = plan
                todo.append(plan.inner)
        cg.__dict__["_nested_plans"] = cached
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
        if plan.run_inline is not None:
            result = self._run_inline(plan, iid, kwargs)
            self._inline_count += 1
            if self._inline_count % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        else:
            result = await self._run_with_options(plan, iid, kwargs)
        if isinstance(result, Skipped):
            self._mark_skipped(nid, result.reason)
            return None
        value, data_out, started = result
        self.ctx.emit(NodeFinished, iid, time.perf_counter() - started)
        if plan.run_inline is not None:
            self.ctx.journal.stage(iid, data_out)
            return nid, value
        await self.ctx.journal.commit(iid, data_out)
        self.values[nid] = value
        self._settled(nid)
        return None

    def _run_inline(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any]
    ) -> tuple[Any, bytes, float] | Skipped:
        assert plan.run_inline is not None
        self.ctx.emit(NodeStarted, iid, 1)
        started = time.perf_counter()
        try:
            value = plan.run_inline(**kwargs)
            return value, plan.dump(value), started
        except Exception as exc:
            return self._on_final_error(plan, iid, _describe(exc), 1, started)

    async def _run_with_options(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any]
    ) -> tuple[Any, bytes, float] | Skipped:
        """Attempts until one succeeds or the retries are spent (a failure that says it is
        not retryable ends them at once), then the error policy."""
        options = plan.spec.options
        attempt, started = 0, time.perf_counter()

        async def once() -> tuple[Any, bytes, float]:
            nonlocal attempt, started
            attempt += 1
            self.ctx.emit(NodeStarted, node=iid, attempt=attempt)
            started = time.perf_counter()
            value = await self._attempt(plan, iid, kwargs, attempt)
            try:
                return value, plan.dump(value), started
            except ValueError as exc:
                raise OutputError(iid, str(exc), retryable=False) from None

        try:
            if options.retries == 0:
                return await once()
            return await _retrying(options, lambda state: self._before_retry(iid, state))(once)
        except Exception as exc:
            return self._on_final_error(plan, iid, _describe(exc), attempt, started)

    def _before_retry(self, iid: str, state: RetryCallState) -> None:
        """Before the pause between two attempts: say which failed, and for how long."""
        assert state.outcome is not None and state.next_action is not None
        error = state.outcome.exception()
        assert error is not None
        self.ctx.emit(
            NodeRetrying,
            node=iid,
            attempt=state.attempt_number,
            error=_describe(error),
            delay_s=state.next_action.sleep,
        )

    def _on_final_error(
        self, plan: NodePlan, iid: str, message: str, attempt: int, started: float
    ) -> tuple[Any, bytes, float] | Skipped:
        """What the node's error policy makes of its last failure: a skip, the fallback as
        its output, or the end of the run (`RunFailed`)."""
        options = plan.spec.options
        self.ctx.emit(NodeFailed, node=iid, error=message, attempt=attempt, policy=options.on_error)
        if options.on_error == "skip":
            return Skipped(f"failed: {message}")
        if options.on_error == "fallback":
            return options.fallback, plan.dump(options.fallback), started
        raise RunFailed.at_node(self.ctx.run_id, iid, message)

    async def _attempt(self, plan: NodePlan, iid: str, kwargs: dict[str, Any], attempt: int) -> Any:
        call = NodeCall(self.ctx, plan.spec, plan.cn, iid, kwargs, attempt, self)
        timeout = plan.spec.options.timeout_s
        limiter = self.ctx.limiter if plan.executor.takes_slot else None
        try:
            with anyio.fail_after(timeout):
                if limiter is None:
                    return await plan.executor.run(call)
                async with limiter:
                    return await plan.executor.run(call)
        except TimeoutError:
            raise NodeError(iid, f"timed out after {timeout} s") from None

    # -- what executors of nodes that run nodes use (`treadle.runtime.nodes.base.Scope`) --

    @property
    def graph(self) -> CompiledGraph:
        return self.cg

    def evaluate(self, binding: Any) -> Any:
        return make_getter(binding)[0](self.values, self.inputs, None)

    def runs_inline(self, node: CompiledNode) -> bool:
        return self._inner_plan(node).inline

    async def run_graph(self, graph: CompiledGraph, inputs: dict[str, Any], prefix: str) -> Any:
        return await GraphScope(self.ctx, graph, inputs, prefix).run()

    async def run_element(self, node: CompiledNode, instance: str, item: Any) -> Any:
        plan = self._inner_plan(node)
        data = self.ctx.restored.get(instance)
        if data is not None:
            return load_value(node.output_type, data)
        kwargs = {name: get(self.values, self.inputs, item) for name, get in plan.getters}
        if plan.run_inline is not None:
            result = self._run_inline(plan, instance, kwargs)
        else:
            result = await self._run_with_options(plan, instance, kwargs)
        if isinstance(result, Skipped):
            self.ctx.emit(NodeSkipped, node=instance, reason=result.reason)
            return result
        value, data, started = result
        self.ctx.emit(NodeFinished, node=instance, duration_s=time.perf_counter() - started)
        await self.ctx.journal.commit(instance, data)
        # a retry of the whole map then reuses the elements that already finished
        self.ctx.restored[instance] = data
        return value

    def _inner_plan(self, node: CompiledNode) -> NodePlan:
        """The plan of a node run by another (a map's inner node), made with its parent's."""
        return _nested_plans(self.cg)[id(node)]

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


class _jittered(wait_base):
    """tenacity wait: `wait`'s delay less a random share of it, at most `jitter` (0..1)."""

    def __init__(self, wait: wait_base, jitter: float) -> None:
        self.wait = wait
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        return float(self.wait(retry_state)) * (1 - self.jitter * random.random())


def _retrying(options: NodeOptions, before_sleep: Callable[[RetryCallState], None]) -> Any:
    """Attempts under `options`: `retries` more after the first, the n-th pause
    `min(backoff_max_s, backoff_s * 2**(n-1))` less up to `jitter` of it, on anyio's clock
    (so cancellation ends a pause at once); a failure whose `retryable` is False is final."""
    return AsyncRetrying(
        stop=stop_after_attempt(options.retries + 1),
        wait=_jittered(
            wait_exponential(multiplier=options.backoff_s, max=options.backoff_max_s),
            options.jitter,
        ),
        # tenacity sees every BaseException: a cancellation must end the attempts, not retry
        retry=retry_if_exception(
            lambda exc: isinstance(exc, Exception) and getattr(exc, "retryable", True)
        ),
        before_sleep=before_sleep,
        sleep=anyio.sleep,
        reraise=True,
    )


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, RunFailed) and exc.node is not None:
        return f"{exc.node}: {exc.reason}"
    if isinstance(exc, NodeError):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
