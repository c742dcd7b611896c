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

import logging
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
from treadle.graphs.spec import ERROR, INDEX, CacheOptions, FirstOf, NodeOptions, NodeSpec, Ref
from treadle.runtime.core.cache import fingerprint, node_cache_key
from treadle.runtime.core.context import RunContext
from treadle.runtime.core.errors import (
    NodeTimeout,
    OutputError,
    RunFailed,
    describe_error,
    error_info,
    error_types,
)
from treadle.runtime.core.events import (
    CacheHit,
    NodeFailed,
    NodeFinished,
    NodeReady,
    NodeRetrying,
    NodeSkipped,
    NodeStarted,
)
from treadle.runtime.core.values import Getter, adapter, dump_value, load_value, make_getter
from treadle.runtime.core.waiting import InputPending
from treadle.runtime.nodes.base import NodeCall, NodeExecutor, Skipped
from treadle.runtime.nodes.registry import executor_for

__all__ = ["GraphScope", "NodePlan", "plans_for"]

log = logging.getLogger(__name__)

#: an inline chain yields to the event loop this often, so it can be cancelled
_YIELD_EVERY = 64
#: at most this many inline outputs wait for one commit
_STAGE_LIMIT = 512
#: the journal key suffix of a node its error policy skipped (the decision is final: a
#: resumed run skips it again rather than running it again)
_SKIPPED = "$skipped"


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
    #: the plan of its `on_error` handler
    handler: NodePlan | None = None
    #: its result cache options, and what defines it in a cache key (`fingerprint`)
    cache: CacheOptions | None = None
    cache_id: str = ""
    #: whether it (or a node it runs) reads `$index`: its element's index is then bound
    uses_index: bool = False

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
    uses_index = False
    # every reference the node reads (a map's `over` and its inner node's included): a
    # skipped node it refers to directly skips it; a first_of only if all are skipped
    for _, binding in kind_of(spec).bindings(spec):
        if isinstance(binding, FirstOf):
            soft.append(make_getter(binding)[1])
        elif isinstance(binding, Ref):
            hard.extend(make_getter(binding)[1])
            uses_index = uses_index or binding.node == INDEX
    executor = executor_for(spec)
    options = spec.options
    cache = options.cache_options
    simple = (
        options.timeout_s is None
        and options.retries == 0
        and options.handler is None
        and cache is None
    )
    run_inline = executor.inline(spec) if simple else None
    inner = _plan(cn.inner) if cn.inner is not None else None
    handler = _plan(cn.handler) if cn.handler is not None else None
    return NodePlan(
        cn,
        getters,
        tuple(dict.fromkeys(hard)),
        tuple(soft),
        executor,
        run_inline,
        inner,
        handler,
        cache,
        fingerprint(spec) if cache is not None else "",
        uses_index or (handler is not None and handler.uses_index),
    )


def plans_for(cg: CompiledGraph) -> dict[str, NodePlan]:
    cached = cg.__dict__.get("_plans")
    if cached is None:
        cached = {nid: _plan(cn) for nid, cn in cg.nodes.items()}
        cg.__dict__["_plans"] = cached
    return cached


def _nested_plans(cg: CompiledGraph) -> dict[int, NodePlan]:
    """The plans of nodes that other nodes run (a map's inner node, a race's branches, an
    error handler, and so on down), by the id of their `CompiledNode`."""
    cached = cg.__dict__.get("_nested_plans")
    if cached is None:
        cached = {}

        def add(plan: NodePlan) -> None:
            for sub in (plan.inner, plan.handler):
                if sub is not None:
                    cached[id(sub.cn)] = sub
                    add(sub)
            for branch in plan.cn.nested.values():
                cached[id(branch)] = _plan(branch)
                add(cached[id(branch)])

        for top in plans_for(cg).values():
            add(top)
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
        #: nodes that wait for human input (they and what depends on them do not settle)
        self._waiting: dict[str, InputPending] = {}

    # -- driving -----------------------------------------------------------------------

    async def run(self) -> Any:
        for nid, count in self.remaining.items():
            if count == 0:
                self._became_ready(nid)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._dispatch(None)
        if self._waiting:
            # everything that could run has: the run (or the node that runs this scope)
            # waits for the answers (listed in the graph's order)
            waiting = self._waiting
            raise InputPending.merge([waiting[n] for n in self.cg.order if n in waiting])
        return self._output()

    def _dispatch(self, local: deque[str] | None) -> None:
        """Hand out ready nodes: quick inline ones (and one other) stay with the caller's
        task via `local`; the rest get tasks of their own.

        The one other node always goes last in `local`: an inline node queued behind a
        node that awaits would wait for it, a barrier between siblings."""
        if not self.ready:
            return
        assert self._tg is not None
        plans = self.plans
        held: str | None = None
        if local and not plans[local[-1]].inline:
            held = local.pop()
        while self.ready:
            nid = self.ready.popleft()
            if local is not None and plans[nid].inline:
                local.append(nid)
            elif local is not None and held is None:
                held = nid
            else:
                self._tg.start_soon(self._drive, nid, name=f"node {self.prefix}{nid}")
        if held is not None:
            assert local is not None
            local.append(held)

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
        restored = self.ctx.restored
        data = restored.get(iid)
        if data is not None:
            self.values[nid] = load_value(plan.cn.output_type, data)
            self._settled(nid)
            return None
        if restored and (skipped := restored.get(iid + _SKIPPED)) is not None:
            self._mark_skipped(nid, skipped.decode())
            return None
        values, inputs = self.values, self.inputs
        kwargs = {name: get(values, inputs, None) for name, get in plan.getters}
        if plan.run_inline is not None:
            result = self._run_inline(plan, iid, kwargs)
            self._inline_count += 1
            if self._inline_count % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        else:
            try:
                result = await self._run_with_options(plan, iid, kwargs, inputs, None)
            except InputPending as pending:
                self._waiting[nid] = pending  # not settled: its dependents wait too
                return None
        if isinstance(result, Skipped):
            self.ctx.journal.stage(iid + _SKIPPED, result.reason.encode())
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
            return self._on_final_error(plan, iid, exc, 1, started, self._policy(plan, exc))

    async def _run_with_options(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any], inputs: dict[str, Any], item: Any
    ) -> tuple[Any, bytes, float] | Skipped:
        """Attempts until one succeeds or the retries are spent (a failure that says it is
        not retryable ends them at once), then the error policy. With `cache`, a cached
        output replaces the attempts, and a new one is cached. (`inputs` and `item` are the
        scope's values an error handler binds.)"""
        options = plan.spec.options
        attempt, started = 0, time.perf_counter()
        key: str | None = None
        if plan.cache is not None and self.ctx.cache is not None:
            key = node_cache_key(
                plan.cache,
                tenant=self.ctx.options.tenant,
                graph=self.cg.name,
                node=plan.id,
                fingerprint=plan.cache_id,
                inputs=kwargs,
            )
            hit = await self._cached(plan, iid, key)
            if hit is not None:
                return hit

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
                done = await once()
            else:
                retrying = _retrying(options, lambda state: self._before_retry(iid, state))
                done = await retrying(once)
        except InputPending:
            raise  # not a failure: it waits
        except Exception as exc:
            policy = self._policy(plan, exc)
            if policy == "handler":
                return await self._handle(plan, iid, exc, attempt, inputs, item)
            return self._on_final_error(plan, iid, exc, attempt, started, policy)
        if key is not None:
            await self._cache_put(plan, key, done[1])
        return done

    async def _cached(self, plan: NodePlan, iid: str, key: str) -> tuple[Any, bytes, float] | None:
        """The node's cached output, announced by `CacheHit` (None: not cached). A cache
        that cannot be read is no reason to fail: the node runs."""
        assert self.ctx.cache is not None
        try:
            data = await self.ctx.cache.cache_get(key)
        except Exception as exc:
            log.warning("result cache: reading %s failed, running the node: %s", iid, exc)
            return None
        if data is None:
            return None
        try:
            value = load_value(plan.cn.output_type, data)
        except ValueError:  # written by a version of the node with another output type
            return None
        self.ctx.emit(NodeStarted, node=iid, attempt=1)
        self.ctx.emit(CacheHit, node=iid, key=key)
        return value, data, time.perf_counter()

    async def _cache_put(self, plan: NodePlan, key: str, data: bytes) -> None:
        assert self.ctx.cache is not None and plan.cache is not None
        try:
            await self.ctx.cache.cache_put(key, data, plan.cache.ttl_s)
        except Exception as exc:
            log.warning("result cache: writing %s failed: %s", plan.id, exc)

    def _before_retry(self, iid: str, state: RetryCallState) -> None:
        """Before the pause between two attempts: say which failed, and for how long."""
        assert state.outcome is not None and state.next_action is not None
        error = state.outcome.exception()
        assert error is not None
        self.ctx.emit(
            NodeRetrying,
            node=iid,
            attempt=state.attempt_number,
            error=describe_error(error),
            delay_s=state.next_action.sleep,
        )

    @staticmethod
    def _policy(plan: NodePlan, exc: BaseException) -> str:
        """The error policy that applies to `exc`: the node's, unless `catch` names error
        types and this is none of them."""
        options = plan.spec.options
        catch = options.catch
        if catch is not None and not set(catch).intersection(error_types(exc)):
            return "fail"
        return options.on_error

    def _on_final_error(
        self,
        plan: NodePlan,
        iid: str,
        exc: BaseException,
        attempt: int,
        started: float,
        policy: str,
    ) -> tuple[Any, bytes, float] | Skipped:
        """What the error policy makes of the node's last failure: a skip, the fallback as
        its output, or the end of the run (`RunFailed`)."""
        message = describe_error(exc)
        self.ctx.emit(NodeFailed, node=iid, error=message, attempt=attempt, policy=policy)
        if policy == "skip":
            return Skipped(f"failed: {message}")
        if policy == "fallback":
            return plan.cn.fallback, plan.dump(plan.cn.fallback), started
        raise RunFailed.at_node(self.ctx.run_id, iid, message, error_info(exc, iid, attempt))

    async def _handle(
        self,
        plan: NodePlan,
        iid: str,
        exc: BaseException,
        attempt: int,
        inputs: dict[str, Any],
        item: Any,
    ) -> tuple[Any, bytes, float] | Skipped:
        """`on_error: handler`: run the handler (instance `<node>/<handler id>`, under its
        own options) with the failure bound as `$error`; its output is the node's."""
        handler = plan.handler
        assert handler is not None  # compile pairs on_error: handler with a handler node
        message = describe_error(exc)
        self.ctx.emit(NodeFailed, node=iid, error=message, attempt=attempt, policy="handler")
        env = {**inputs, ERROR: error_info(exc, iid, attempt)}
        kwargs = {name: get(self.values, env, item) for name, get in handler.getters}
        hid = f"{iid}/{handler.id}"
        result = await self._run_nested(handler, hid, kwargs, env, item)
        if isinstance(result, Skipped):
            self.ctx.emit(NodeSkipped, node=hid, reason=result.reason)
            return result
        value, _, started = result
        self.ctx.emit(NodeFinished, node=hid, duration_s=time.perf_counter() - started)
        return value, plan.dump(value), started

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
            raise NodeTimeout(iid, f"timed out after {timeout} s") from None

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

    async def run_element(
        self, node: CompiledNode, instance: str, item: Any = None, index: int | None = None
    ) -> Any:
        plan = self._inner_plan(node)
        restored = self.ctx.restored
        data = restored.get(instance)
        if data is not None:
            return load_value(node.output_type, data)
        if restored and (skipped := restored.get(instance + _SKIPPED)) is not None:
            return Skipped(skipped.decode())
        inputs = {**self.inputs, INDEX: index} if plan.uses_index else self.inputs
        kwargs = {name: get(self.values, inputs, item) for name, get in plan.getters}
        result = await self._run_nested(plan, instance, kwargs, inputs, item)
        if isinstance(result, Skipped):
            self.ctx.emit(NodeSkipped, node=instance, reason=result.reason)
            self.ctx.journal.stage(instance + _SKIPPED, result.reason.encode())
            return result
        value, data, started = result
        self.ctx.emit(NodeFinished, node=instance, duration_s=time.perf_counter() - started)
        await self.ctx.journal.commit(instance, data)
        # a retry of the whole map then reuses the elements that already finished
        self.ctx.restored[instance] = data
        return value

    async def _run_nested(
        self, plan: NodePlan, iid: str, kwargs: dict[str, Any], inputs: dict[str, Any], item: Any
    ) -> tuple[Any, bytes, float] | Skipped:
        """A node another one runs (an element, a branch, a handler), inline if it can."""
        if plan.run_inline is not None:
            return self._run_inline(plan, iid, kwargs)
        return await self._run_with_options(plan, iid, kwargs, inputs, item)

    def _inner_plan(self, node: CompiledNode) -> NodePlan:
        """The plan of a node run by another (a map's inner node, a race's branch), made
        with its parent's."""
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
                # no node failed here (one that did ended the run already): say why none
                # of the nodes the output reads from ran, each reason once
                why = "; ".join(dict.fromkeys(self.skipped.get(n, "did not run") for n in nodes))
                where = f" of {self.prefix.rstrip('/')!r}" if self.prefix else ""
                raise RunFailed(self.ctx.run_id, f"output {name!r}{where} is unavailable: {why}")
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
