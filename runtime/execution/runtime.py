"""`Runtime`: the SDK's entry point for running programs.

    runtime = Runtime()                      # memory store, scripted "default" model
    result = await runtime.run(graph, {"question": "..."})
    async with runtime.start(graph, inputs) as run:
        async for event in run.events(): ...

A runtime owns the state store, the model aliases (backends), the listeners that see
every event of its runs, and the interceptor chain every LLM and tool call goes through
(`treadle.runtime.core.interceptors`): the given `interceptors` in order, then listeners
that are also interceptors (the OpenTelemetry tracer's passes each call's trace context
on), then, nearest to the backend, the `admission` (the scheduler that orders LLM calls
across all of the runtime's runs), when configured.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError

from treadle.backends.base import Backend, ClosableBackend
from treadle.backends.scripted import ScriptedBackend
from treadle.errors import RunError
from treadle.graphs.builder import Graph
from treadle.graphs.compile import DEFAULT_MODEL, CompiledGraph, compile_graph
from treadle.graphs.spec import GraphSpec
from treadle.runtime.core.context import Listener, RunContext, RunOptions
from treadle.runtime.core.errors import RunCancelled, RunFailed
from treadle.runtime.core.events import Event, RunFinished, RunStarted
from treadle.runtime.core.gateway import dispatch
from treadle.runtime.core.interceptors import (
    Admission,
    CallAdmission,
    CallChain,
    CallInterceptor,
    invoke_tool,
)
from treadle.runtime.core.journal import Journal
from treadle.runtime.core.store import RunRecord, RunStatus, StateStore
from treadle.runtime.execution.orchestrator import GraphScope
from treadle.runtime.stores.memory import MemoryStore

GraphLike = Graph | GraphSpec | CompiledGraph

logger = logging.getLogger(__name__)


class InvalidInputs(RunError, ValueError):
    """The inputs given to a run do not match the graph's declared inputs."""


@dataclass
class RunResult:
    run_id: str
    status: RunStatus
    output: Any
    error: str | None
    events: list[Event] = field(default_factory=list, repr=False)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def raise_for_status(self) -> RunResult:
        if self.status == "cancelled":
            raise RunCancelled(self.run_id)
        if self.status != "succeeded":
            raise RunFailed(self.run_id, self.error or "unknown error")
        return self


class RunHandle:
    """A run in progress: its events as they happen, its result, and a way to cancel it."""

    def __init__(self, ctx: RunContext, scope: anyio.CancelScope):
        self._ctx = ctx
        self._scope = scope
        self._done = anyio.Event()
        self._result: RunResult | None = None

    @property
    def run_id(self) -> str:
        return self._ctx.run_id

    def cancel(self) -> None:
        self._scope.cancel()

    async def events(self, after: int = 0) -> AsyncIterator[Event]:
        """Every event of this run (from index `after` on), up to its `RunFinished`."""
        index = after
        log = self._ctx.log
        while True:
            while index < len(log):
                event = log[index]
                index += 1
                yield event
                if isinstance(event, RunFinished):
                    return
            await self._ctx.wait_for_events(index)

    async def result(self) -> RunResult:
        await self._done.wait()
        assert self._result is not None
        return self._result

    def _finish(self, result: RunResult) -> None:
        self._result = result
        self._done.set()


class Runtime:
    """Runs programs. `models` maps aliases to backends (or backend config dicts)."""

    def __init__(
        self,
        *,
        store: StateStore | None = None,
        models: Mapping[str, Backend | Mapping[str, Any]] | None = None,
        max_concurrency: int | None = None,
        stream_tokens: bool = False,
        admission: CallAdmission | None = None,
        listeners: Sequence[Listener] = (),
        interceptors: Sequence[CallInterceptor] = (),
    ) -> None:
        self.store: StateStore = store if store is not None else MemoryStore()
        self._models: dict[str, Backend] = {}
        self._model_configs: dict[str, Mapping[str, Any]] = {}
        for alias, backend in (models or {}).items():
            if isinstance(backend, Mapping):
                self._model_configs[alias] = backend
            else:
                self._models[alias] = backend
        self.max_concurrency = max_concurrency
        self.stream_tokens = stream_tokens
        self.admission = admission
        self.listeners = list(listeners)
        chain = list(interceptors)
        for hook in self.listeners:  # a listener may wrap calls too (the tracer's does)
            if isinstance(hook, CallInterceptor):
                chain.append(hook)
        if admission is not None:
            chain.append(Admission(admission))
        self.chain = CallChain(chain)
        self._send_llm = self.chain.wrap_llm(dispatch)
        self._invoke_tool = self.chain.wrap_tool(invoke_tool)
        self._created: dict[str, Backend] = {}

    # -- graphs and backends -----------------------------------------------------------

    def compile(self, graph: GraphLike) -> CompiledGraph:
        if isinstance(graph, CompiledGraph):
            return graph
        spec = graph.spec if isinstance(graph, Graph) else graph
        return compile_graph(spec, models=[*self._models, *self._model_configs])

    def _backends(self, cg: CompiledGraph) -> dict[str, Backend]:
        backends: dict[str, Backend] = {}
        for alias in cg.all_models() | {DEFAULT_MODEL}:
            if alias in self._models:
                backends[alias] = self._models[alias]
                continue
            config = self._model_configs.get(alias) or _declared_config(cg, alias)
            if config is None:
                if alias == DEFAULT_MODEL:
                    backends[alias] = self._models.setdefault(alias, ScriptedBackend())
                continue
            key = alias + json.dumps(config, sort_keys=True, default=str)
            if key not in self._created:
                from treadle.backends.factory import create_backend

                self._created[key] = create_backend(dict(config))
            backends[alias] = self._created[key]
        return backends

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        graph: GraphLike,
        inputs: Mapping[str, Any] | BaseModel | None = None,
        *,
        run_id: str | None = None,
        tenant: str | None = None,
        source: str | None = None,
        check: bool = True,
    ) -> RunResult:
        """Run to completion. With `check` (default) a failed run raises `RunFailed`."""
        async with self.start(graph, inputs, run_id=run_id, tenant=tenant, source=source) as run:
            result = await run.result()
        return result.raise_for_status() if check else result

    async def resume(self, run_id: str, graph: GraphLike, *, check: bool = True) -> RunResult:
        """Continue an interrupted run from its journal: finished nodes are not re-run."""
        record = await self.store.get_run(run_id)
        if record is None:
            raise KeyError(f"no run {run_id!r} in the store")
        async with self.open_run(self.compile(graph), record, resume=True) as run:
            result = await run.result()
        return result.raise_for_status() if check else result

    @asynccontextmanager
    async def start(
        self,
        graph: GraphLike,
        inputs: Mapping[str, Any] | BaseModel | None = None,
        *,
        run_id: str | None = None,
        tenant: str | None = None,
        source: str | None = None,
    ) -> AsyncIterator[RunHandle]:
        """Start a run in the background of the `async with` block."""
        cg = self.compile(graph)
        validated = validate_inputs(cg, inputs)
        record = RunRecord(
            run_id=run_id or uuid.uuid4().hex,
            graph=cg.name,
            status="running",
            tenant=tenant,
            inputs=validated.model_dump(mode="json"),
            source=source,
        )
        await self.store.create_run(record)
        async with self.open_run(cg, record, resume=False) as handle:
            yield handle

    @asynccontextmanager
    async def open_run(
        self, cg: CompiledGraph, record: RunRecord, *, resume: bool
    ) -> AsyncIterator[RunHandle]:
        """Execute a run whose record is already in the store (a daemon's API created it);
        with `resume`, continue from its journal."""
        inputs_model = validate_inputs(cg, record.inputs)
        restored: dict[str, bytes] = {}
        first_seq = 1
        if resume:
            restored = await self.store.load_outputs(record.run_id)
            previous = await self.store.read_events(record.run_id)
            first_seq = (previous[-1].seq + 1) if previous else 1
            await self.store.update_run(record.run_id, status="running", error=None)
        ctx = RunContext(
            record.run_id,
            Journal(self.store, record.run_id),
            backends=self._backends(cg),
            send_llm=self._send_llm,
            invoke_tool=self._invoke_tool,
            options=RunOptions(
                stream_tokens=self.stream_tokens,
                max_concurrency=self.max_concurrency,
                tenant=record.tenant,
            ),
            restored=restored,
            first_seq=first_seq,
            listeners=self.listeners,
        )
        inputs = {name: getattr(inputs_model, name) for name in type(inputs_model).model_fields}
        scope = anyio.CancelScope()
        handle = RunHandle(ctx, scope)
        # leaving the block waits for the run, as a task group does; `handle.cancel()` stops it
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._execute, ctx, cg, inputs, scope, handle, resume)
            yield handle

    async def _execute(
        self,
        ctx: RunContext,
        cg: CompiledGraph,
        inputs: dict[str, Any],
        scope: anyio.CancelScope,
        handle: RunHandle,
        resume: bool,
    ) -> None:
        started = time.perf_counter()
        ctx.emit(RunStarted, graph=cg.name, resumed=resume)
        try:
            with scope:
                output = await GraphScope(ctx, cg, inputs).run()
            if scope.cancelled_caught:
                await self._finish(ctx, handle, started, "cancelled", None, None)
            else:
                await self._finish(ctx, handle, started, "succeeded", output, None)
        except anyio.get_cancelled_exc_class():
            # cancelled from outside (the caller's scope, a shutting-down process): the run
            # did not end, so it gets no terminal status; its finished work is made durable
            # and it can be resumed (by this caller, or by another worker)
            await self._interrupt(ctx, handle, started)
            raise
        except Exception as exc:
            await self._finish(ctx, handle, started, "failed", None, _failure_message(exc))

    async def _interrupt(self, ctx: RunContext, handle: RunHandle, started: float) -> None:
        with anyio.CancelScope(shield=True):
            if self.admission is not None:
                self.admission.end_run(ctx, "interrupted")
            try:
                await ctx.journal.commit(final=True)
            except Exception as exc:  # e.g. the lease passed on: the new owner writes now
                logger.info("run %s interrupted; its last events were not written: %s",
                            ctx.run_id, exc)  # fmt: skip
            error = "interrupted before it finished; resumable"
            duration = time.perf_counter() - started
            handle._finish(RunResult(ctx.run_id, "interrupted", None, error, ctx.log, duration))

    async def _finish(
        self,
        ctx: RunContext,
        handle: RunHandle,
        started: float,
        status: RunStatus,
        output: Any,
        error: str | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            duration = time.perf_counter() - started
            if self.admission is not None:
                self.admission.end_run(ctx, status)
            ctx.emit(RunFinished, status=status, error=error, duration_s=duration)
            dumped = output.model_dump(mode="json") if isinstance(output, BaseModel) else output
            try:
                await ctx.journal.commit(final=True)
                await self.store.update_run(ctx.run_id, status=status, output=dumped, error=error)
            except Exception as exc:  # the store itself failed: say so, do not hide it
                status, error = "failed", f"state store error: {exc}"
            handle._finish(RunResult(ctx.run_id, status, output, error, ctx.log, duration))

    async def aclose(self) -> None:
        """Close the store and the backends this runtime created from configs."""
        for backend in self._created.values():
            if isinstance(backend, ClosableBackend):
                await backend.aclose()
        self._created.clear()
        await self.store.close()


def validate_inputs(cg: CompiledGraph, inputs: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    data = inputs.model_dump() if isinstance(inputs, BaseModel) else dict(inputs or {})
    try:
        return cg.input_model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(inputs)'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInputs(f"invalid inputs for graph {cg.name!r}: {problems}") from None


def _declared_config(cg: CompiledGraph, alias: str) -> Mapping[str, Any] | None:
    if alias in cg.spec.models:
        return cg.spec.models[alias]
    for node in cg.nodes.values():
        if node.child is not None:
            found = _declared_config(node.child, alias)
            if found is not None:
                return found
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _failure_message(exc: BaseException) -> str:
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, RunFailed):
            return leaf.error
    leaf = leaves[0]
    return f"internal error: {type(leaf).__name__}: {leaf}"
