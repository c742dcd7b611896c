"""`Runtime`: the SDK's entry point for running programs.

    runtime = Runtime()                      # memory store, scripted "default" model
    result = await runtime.run(graph, {"question": "..."})
    async with runtime.start(graph, inputs) as run:
        async for event in run.events(): ...

A run that reaches an `ask` node with no answer parks (status `waiting`: it holds no
task, scheduler slot or KV pin) once nothing else of it can run; `run()` then returns a
`RunResult` whose `pending` lists the requests. `runtime.resume(run_id, graph, input=...)`
answers and continues it, in this process or any other that opens the same store; inside
`start(...)`, `await run.resume(value)` continues the same handle. A request whose
`deadline_s` passes while the handle is open is answered by its default there and then.

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
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError

from treadle.backends.base import Backend, ClosableBackend
from treadle.backends.factory import create_backend, describe_entry_problems, model_entry_problems
from treadle.backends.scripted import ScriptedBackend
from treadle.errors import RunError
from treadle.graphs.builder import Graph
from treadle.graphs.compile import DEFAULT_MODEL, CompiledGraph, compile_graph
from treadle.graphs.spec import GraphSpec
from treadle.runtime.core.cache import ResultCache
from treadle.runtime.core.context import Listener, RunContext, RunOptions
from treadle.runtime.core.errors import RunCancelled, RunFailed
from treadle.runtime.core.events import Event, RunFinished, RunStarted, RunWaiting
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
from treadle.runtime.core.waiting import InputPending, InputRequest, answer_key
from treadle.runtime.execution.inputs import (
    InputConflict,
    InputResult,
    answers_of,
    record_input,
)
from treadle.runtime.execution.orchestrator import GraphScope
from treadle.runtime.stores.memory import MemoryStore

GraphLike = Graph | GraphSpec | CompiledGraph

logger = logging.getLogger(__name__)

#: backends a runtime keeps built from configs (a worker serves many tenants' workflows)
MAX_BUILT_BACKENDS = 1024


class InvalidInputs(RunError, ValueError):
    """The inputs given to a run do not match the graph's declared inputs."""


class InvalidModel(RunError, ValueError):
    """A model alias's backend cannot be built from its configuration."""


#: `resume(..., input=NO_INPUT)`: continue without answering anything
NO_INPUT: Any = object()


@dataclass
class RunResult:
    run_id: str
    status: RunStatus
    output: Any
    error: str | None
    events: list[Event] = field(default_factory=list, repr=False)
    duration_s: float = 0.0
    #: while `waiting`: the requests the run waits on
    pending: list[InputRequest] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def waiting(self) -> bool:
        return self.status == "waiting"

    def raise_for_status(self) -> RunResult:
        """The result itself if the run succeeded or waits for input; else `RunFailed` or
        `RunCancelled`."""
        if self.status == "cancelled":
            raise RunCancelled(self.run_id)
        if self.status not in ("succeeded", "waiting"):
            raise RunFailed(self.run_id, self.error or "unknown error")
        return self


class RunHandle:
    """A run in progress: its events as they happen, its result, a way to cancel it, and,
    when it waits for input, a way to answer and continue it (`resume`)."""

    def __init__(
        self, ctx: RunContext, scope: anyio.CancelScope, store: StateStore, cg: CompiledGraph
    ):
        self._ctx = ctx
        self._scope = scope
        self._store = store
        self._cg = cg
        self._done = anyio.Event()
        self._result: RunResult | None = None
        #: set by `resume` (or a deadline): the parked run goes on
        self._wake: anyio.Event | None = None
        #: False once the `async with` block that opened the run is left: a run that parks
        #: then is left waiting in the store rather than in this process
        self._held = True
        self._park_scope: anyio.CancelScope | None = None
        #: the run waited for input (its record lists requests to clear when it ends)
        self._had_requests = False

    @property
    def run_id(self) -> str:
        return self._ctx.run_id

    @property
    def pending(self) -> list[InputRequest]:
        """The requests the run waits on now (empty unless it is parked)."""
        result = self._result
        return list(result.pending) if result is not None and self._wake is not None else []

    def cancel(self) -> None:
        self._scope.cancel()

    def undurable_events(self) -> list[Event]:
        """The run's events so far that are not in the store yet (a daemon's worker sends
        them to an event stream that starts mid-node)."""
        return self._ctx.journal.undurable()

    async def events(self, after: int = 0) -> AsyncIterator[Event]:
        """Every event of this run (from index `after` on), up to its `RunFinished`, or
        its `RunWaiting` when it parks to wait for input (after `resume`, read on with
        `events(after=...)`)."""
        index = after
        log = self._ctx.log
        while True:
            while index < len(log):
                event = log[index]
                index += 1
                yield event
                if isinstance(event, RunFinished | RunWaiting):
                    return
            await self._ctx.wait_for_events(index)

    async def result(self) -> RunResult:
        """The run's result once it has finished, or parked to wait for input."""
        await self._done.wait()
        assert self._result is not None
        return self._result

    async def resume(
        self, input: Any = NO_INPUT, *, node: str | None = None, key: str | None = None
    ) -> InputResult | None:
        """Answer the request at `node` (optional when the run waits on one) with `input`,
        checked against the request's type, and continue the run in this handle; `result()`
        then waits for its new end. Raises `InputRejected` for an answer that does not fit,
        `InputConflict` when the run is not waiting (for that request)."""
        if self._wake is None:
            raise InputConflict(f"run {self.run_id!r} is not waiting for input")
        answered = None
        if input is not NO_INPUT:
            answered = await record_input(self._store, answers_of(self._cg), self.run_id,
                                          input, node=node, key=key)  # fmt: skip
        self._done = anyio.Event()
        self._result = None
        self._wake.set()
        return answered

    def _finish(self, result: RunResult) -> None:
        self._result = result
        self._done.set()

    async def _parked(self, result: RunResult) -> bool:
        """The run parks with `result`: wait here, while the handle is held, for `resume`
        or the earliest deadline of its requests. True: go on; False: leave it waiting."""
        self._wake = wake = anyio.Event()
        self._had_requests = True
        self._finish(result)
        deadlines = [r.expires_at for r in result.pending if r.expires_at is not None]
        try:
            if not self._held:
                return False
            with anyio.CancelScope() as self._park_scope:
                delay = max(0.0, min(deadlines) - time.time()) if deadlines else math.inf
                with anyio.move_on_after(delay):
                    await wake.wait()
                if not wake.is_set():  # a deadline passed: its default answers it
                    self._done = anyio.Event()
                    self._result = None
                return True
            return False  # released while parked
        finally:
            self._park_scope = None
            self._wake = None

    def _release(self) -> None:
        """The opening block is left: stop holding the run in this process."""
        self._held = False
        if self._park_scope is not None:
            self._park_scope.cancel()


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
        cache: ResultCache | None = None,
    ) -> None:
        self.store: StateStore = store if store is not None else MemoryStore()
        #: where nodes with the `cache` option keep their outputs: the store, unless given
        self.cache: ResultCache | None = cache
        if cache is None and isinstance(self.store, ResultCache):
            self.cache = self.store
        self._models: dict[str, Backend] = {}
        self._model_configs: dict[str, Mapping[str, Any]] = {}
        for alias, backend in (models or {}).items():
            if isinstance(backend, Mapping):
                problems = model_entry_problems(backend)
                if problems:
                    text = describe_entry_problems(backend.get("backend"), problems)
                    raise InvalidModel(f"model {alias!r}: {text}")
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
        #: backends built from configs, by (tenant that declared it or None, alias, config)
        self._created: OrderedDict[tuple[str | None, str, str], Backend] = OrderedDict()
        self._retired: list[ClosableBackend] = []
        #: what `default` is when neither the runtime nor a workflow configures it
        self._fallback: Backend = ScriptedBackend()

    # -- graphs and backends -----------------------------------------------------------

    def compile(self, graph: GraphLike) -> CompiledGraph:
        if isinstance(graph, CompiledGraph):
            return graph
        spec = graph.spec if isinstance(graph, Graph) else graph
        return compile_graph(
            spec, models=[*self._models, *self._model_configs], check_model=model_entry_problems
        )

    def _backends(self, cg: CompiledGraph, tenant: str | None = None) -> dict[str, Backend]:
        """The run's backends. An alias resolves to the runtime's own backend or config (the
        operator's), else to the workflow's own declaration, else (`default` only) to a
        scripted backend. Resolving changes nothing another run resolves: a backend built
        from a workflow's declaration is shared only by runs of the same tenant that declare
        the same config (so its state, a simulator's prefix cache say, is the tenant's)."""
        backends: dict[str, Backend] = {}
        for alias in cg.all_models() | {DEFAULT_MODEL}:
            if alias in self._models:
                backends[alias] = self._models[alias]
                continue
            operator = self._model_configs.get(alias)
            config = operator if operator is not None else _declared_config(cg, alias)
            if config is None:
                if alias == DEFAULT_MODEL:
                    backends[alias] = self._fallback
                continue
            owner = None if operator is not None else tenant
            backends[alias] = self._built(owner, alias, config)
        return backends

    def _built(self, owner: str | None, alias: str, config: Mapping[str, Any]) -> Backend:
        key = (owner, alias, json.dumps(config, sort_keys=True, default=str))
        backend = self._created.get(key)
        if backend is not None:
            self._created.move_to_end(key)
            return backend
        try:
            backend = self._created[key] = create_backend(dict(config))
        except ValueError as exc:
            raise InvalidModel(f"model {alias!r}: {exc}") from None
        if len(self._created) > MAX_BUILT_BACKENDS:
            # the least recently used goes; one a run still holds stays usable until it ends
            _, old = self._created.popitem(last=False)
            if isinstance(old, ClosableBackend):
                self._retired.append(old)
        return backend

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
            run._release()  # a run that parks is left waiting in the store
            result = await run.result()
        return result.raise_for_status() if check else result

    async def resume(
        self,
        run_id: str,
        graph: GraphLike,
        input: Any = NO_INPUT,
        *,
        node: str | None = None,
        key: str | None = None,
        check: bool = True,
    ) -> RunResult:
        """Continue an interrupted or waiting run from its journal: finished nodes are not
        re-run. `input` answers the request at `node` (which may be left out when the run
        waits on one request), checked against its type first (`InputRejected`); `key`
        makes the answer idempotent (the same answer with the same key again is accepted
        and changes nothing). A waiting run resumed without input applies the defaults of
        the requests whose deadline has passed and waits on the others."""
        record = await self.store.get_run(run_id)
        if record is None:
            raise KeyError(f"no run {run_id!r} in the store")
        cg = self.compile(graph)
        if input is not NO_INPUT:
            await record_input(
                self.store, answers_of(cg), run_id, input, node=node, key=key, record=record
            )
        async with self.open_run(cg, record, resume=True) as run:
            run._release()  # a run that parks again is left waiting in the store
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
        self._backends(cg)  # a backend that cannot be built fails here, before the run exists
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
        self, cg: CompiledGraph, record: RunRecord, *, resume: bool, min_seq: int = 0
    ) -> AsyncIterator[RunHandle]:
        """Execute a run whose record is already in the store (a daemon's API created it);
        with `resume`, continue from its journal. Its events are numbered after `min_seq`
        too (seqs that clients may have seen published live but that were never
        journaled: `treadle.runtime.daemon.live`). A run that cannot start (its inputs no
        longer fit, a backend cannot be built) is recorded as failed, and the error raised."""
        try:
            inputs_model = validate_inputs(cg, record.inputs)
            backends = self._backends(cg, record.tenant)
        except (InvalidInputs, InvalidModel) as exc:
            await self.store.update_run(record.run_id, status="failed", error=str(exc))
            raise
        restored: dict[str, bytes] = {}
        first_seq = 1
        if resume:
            restored = await self.store.load_outputs(record.run_id)
            previous = await self.store.read_events(record.run_id)
            first_seq = (previous[-1].seq + 1) if previous else 1
            await self.store.update_run(record.run_id, status="running", error=None)
        first_seq = max(first_seq, min_seq + 1)
        ctx = RunContext(
            record.run_id,
            Journal(self.store, record.run_id),
            backends=backends,
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
            cache=self.cache,
            admission=self.admission,
        )
        inputs = {name: getattr(inputs_model, name) for name in type(inputs_model).model_fields}
        scope = anyio.CancelScope()
        handle = RunHandle(ctx, scope, self.store, cg)
        handle._had_requests = bool(record.pending_inputs)
        # leaving the block waits for the run, as a task group does, until it finishes or
        # parks to wait for input; `handle.cancel()` stops it
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._execute, ctx, cg, inputs, scope, handle, resume)
            try:
                yield handle
                if not handle._done.is_set():
                    await handle._done.wait()
            finally:
                handle._release()

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
                while True:
                    try:
                        output = await GraphScope(ctx, cg, inputs).run()
                        break
                    except InputPending as pending:
                        if not await self._park(ctx, handle, started, pending.requests):
                            return  # left waiting: resumed later, by whoever answers
                        started = time.perf_counter()
                        await self._unpark(ctx, cg)
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

    async def _park(
        self, ctx: RunContext, handle: RunHandle, started: float, requests: list[InputRequest]
    ) -> bool:
        """Everything that could run has: the run waits for the answers to `requests`. It
        gives back what it holds (the admission's slot and pin), becomes `waiting` in the
        store, and, while its handle is held, waits in this process (True: go on)."""
        with anyio.CancelScope(shield=True):
            if self.admission is not None:
                self.admission.end_run(ctx, "waiting")
            ctx.emit(RunWaiting, nodes=[r.node for r in requests])
            await ctx.journal.commit(final=True)
            await self.store.update_run(
                ctx.run_id, status="waiting", error=None, pending_inputs=requests
            )
            # an answer recorded while the run was still running, after its ask node
            # looked, would be waited for in vain: go on at once
            outputs = await self.store.load_outputs(ctx.run_id)
        result = RunResult(
            ctx.run_id,
            "waiting",
            None,
            None,
            ctx.log,
            time.perf_counter() - started,
            pending=requests,
        )
        if any(answer_key(r.node) in outputs for r in requests):
            return True
        return await handle._parked(result)

    async def _unpark(self, ctx: RunContext, cg: CompiledGraph) -> None:
        """Continue a parked run in this process, from what its journal holds now."""
        ctx.restored = await self.store.load_outputs(ctx.run_id)
        await self.store.update_run(ctx.run_id, status="running", error=None)
        ctx.emit(RunStarted, graph=cg.name, resumed=True)

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
            changes: dict[str, Any] = {"status": status, "output": dumped, "error": error}
            if handle._had_requests:
                changes["pending_inputs"] = []
            try:
                await ctx.journal.commit(final=True)
                await self.store.update_run(ctx.run_id, **changes)
            except Exception as exc:  # the store itself failed: say so, do not hide it
                status, error = "failed", f"state store error: {exc}"
            handle._finish(RunResult(ctx.run_id, status, output, error, ctx.log, duration))

    async def aclose(self) -> None:
        """Close the store and the backends this runtime created from configs."""
        for backend in [*self._created.values(), *self._retired]:
            if isinstance(backend, ClosableBackend):
                await backend.aclose()
        self._created.clear()
        self._retired.clear()
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
    for child in cg.children():
        found = _declared_config(child, alias)
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
