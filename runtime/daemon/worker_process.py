"""Workers as the daemon runs them: a `Worker` wired to the registry (programs), the import
allow-list (checked again on every loaded program: `check_program`), the quotas (settling a
run frees its tenant's slot; LLM tokens are counted), the retention of finished runs and,
when configured, metrics and tracing. `run_workers` runs a process's workers (in `treadle
serve`, or `treadle worker` through `run_worker_process`); with `--max-concurrent-runs` they
share one pool of slots, so the process runs at most that many runs at once.

The allow-list is checked again here, not only when a definition is registered, because
a definition stored before the operator narrowed `--allow-imports`, or written to Redis
directly, must not get its modules imported: the registry checks a stored definition's
document before loading it, and `check_program` checks the loaded graph (and graphs the
process cached) before it runs."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from treadle.graphs.compile import CompiledGraph
from treadle.runtime.core.context import Listener
from treadle.runtime.core.interceptors import CallInterceptor, InvokeTool, ToolInvocation
from treadle.runtime.core.store import RunRecord
from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.import_allowlist import AllowListViolation, ImportAllowList
from treadle.runtime.daemon.quotas import UsageLedger
from treadle.runtime.daemon.registry import RegistryLoader
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.worker import ProgramCheck, ProgramError, Worker, WorkerOptions
from treadle.runtime.observe.tracing import OtelTracer
from treadle.runtime.observe.tracing_setup import configure_tracing
from treadle.tools.files import files_root

log = logging.getLogger(__name__)


def allowlist_check(allowlist: ImportAllowList) -> ProgramCheck:
    """The worker's `check_program`: every function, tool and type of the loaded graph must
    come from a module `allowlist` allows, else the run fails with the violation as its error."""

    def check(record: RunRecord, cg: CompiledGraph) -> None:
        try:
            allowlist.check_spec(cg.spec)
        except AllowListViolation as exc:
            raise ProgramError(f"refused by the import allow-list: {exc}") from None

    return check


class TenantFiles(CallInterceptor):
    """Confines the built-in `read_file` of each run to `<root>/<its tenant>`; without a
    root (no `--files-root`), to nothing: the operator's directory is never readable."""

    def __init__(self, root: str | None) -> None:
        self.root = Path(root) if root is not None else None

    async def tool_call(self, call: ToolInvocation, call_next: InvokeTool) -> Any:
        tenant = call.ctx.options.tenant
        # tenant ids are lowercase letters, digits, '_' and '-': one plain path component
        root = self.root / tenant if self.root is not None and tenant else None
        with files_root(root):
            return await call_next(call)


def build_worker(
    services: Services,
    ledger: UsageLedger,
    *,
    listeners: Sequence[Listener] = (),
    interceptors: Sequence[CallInterceptor] = (),
    tracer: OtelTracer | None = None,
    worker_id: str | None = None,
    process_slots: anyio.Semaphore | None = None,
) -> Worker:
    config = services.config

    async def settled(record: RunRecord) -> None:
        if record.tenant is not None:
            ledger.release_run(record.tenant, record.run_id)

    return Worker(
        services.queue,
        services.store,
        RegistryLoader(services.registry),
        models=config.models,
        listeners=[ledger.listener, *listeners],
        interceptors=[TenantFiles(config.files_root), *interceptors],
        on_settled=settled,
        tracer=tracer,
        options=WorkerOptions(
            concurrency=config.worker_concurrency,
            drain_s=config.drain_s,
            worker_id=worker_id,
            retain_s=config.retain_s,
            stream_tokens=config.stream_tokens,
        ),
        check_program=allowlist_check(services.registry.allowlist),
        process_slots=process_slots,
    )


async def run_workers(
    services: Services,
    count: int,
    *,
    listeners: Sequence[Listener] = (),
    interceptors: Sequence[CallInterceptor] = (),
    task_status: TaskStatus[list[Worker]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run `count` workers (and their quota ledger) until cancelled or until every worker has
    been stopped (`Worker.stop`). With `max_concurrent_runs` configured, the workers share
    that many slots: the process runs at most that many runs at once."""
    ledger = UsageLedger(services.redis, services.keys)
    tracer = configure_tracing()  # None unless OTEL_TRACES_EXPORTER asks for spans
    cap = services.config.max_concurrent_runs
    slots = anyio.Semaphore(cap) if cap is not None else None
    workers = [
        build_worker(
            services,
            ledger,
            listeners=listeners,
            interceptors=interceptors,
            tracer=tracer,
            process_slots=slots,
        )
        for _ in range(count)
    ]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger.run)
            for worker in workers:
                await tg.start(worker.run)
            task_status.started(workers)
            for worker in workers:
                await worker.wait_stopped()
            tg.cancel_scope.cancel()
    finally:
        if tracer is not None:
            tracer.shutdown()


async def run_worker_process(
    config: DaemonConfig, count: int = 1, *, parent: int | None = None
) -> None:
    """`treadle worker`: run workers until SIGTERM/SIGINT, then drain and hand over. With
    `parent` (the pid of `treadle serve`, for its worker processes), also once that is no
    longer this process's parent (it was killed without the chance to stop its children,
    perhaps before this one had even started)."""
    if config.worker_nice:
        os.nice(config.worker_nice)
    services = Services.open(config)
    try:
        async with anyio.create_task_group() as tg:
            workers: list[Worker] = await tg.start(run_workers, services, count)
            stopping = anyio.Event()
            async with anyio.create_task_group() as watch:
                watch.start_soon(_stop_on_signal, stopping)
                if parent is not None:
                    watch.start_soon(_stop_when_orphaned, stopping, parent)
                await stopping.wait()
                watch.cancel_scope.cancel()
            # workers stop only when told to; `run_workers` returns once they have drained
            for worker in workers:
                worker.stop()
    finally:
        await services.close()


async def _stop_on_signal(stopping: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %s: stopping the workers", signal.Signals(signum).name)
            stopping.set()
            return


async def _stop_when_orphaned(stopping: anyio.Event, parent: int) -> None:
    while os.getppid() == parent:
        await anyio.sleep(1.0)
    log.warning("the process that started this worker (pid %d) is gone: stopping", parent)
    stopping.set()
