"""The worker loop: take runs from the work queue and execute them, many at a time.

A `Worker` claims queue entries (`WorkQueue.claim`: new entries, and entries whose worker
stopped heartbeating), and runs each claimed run as a task of its own while it holds the
run's lease (`LeaseKeeper`). It claims only when it has a free slot: at most
`concurrency` runs at once, and, when the workers of one process share `process_slots`
(`--max-concurrent-runs`), at most that many in the whole process. For one run it:

1. reads the run's record, the journal's last seq and the run's cancel flag (one round
   trip); a run that is already terminal is only acknowledged (a duplicate delivery);
2. loads the program through a `ProgramLoader` (the daemon's loader reads a registered
   definition from Redis and caches compiled graphs by definition hash);
3. marks it `running` and starts it — or, when the journal already has events (the run
   was taken over from a worker that died), resumes it: finished nodes are restored, not
   run again. Its events are published live as they happen (`LiveEvents`, unless
   `live_events` is off), and a run taken over from a dead worker numbers its events after
   every seq that worker may have published;
4. writes everything through `RedisStore.fenced(worker_id)`, so that once the lease has
   passed to another worker this one cannot add to the journal; a lost lease cancels the
   run here (`LeaseKeeper`) and the queue entry is left to the new owner;
5. once the record is terminal, calls the `on_settled` hook (quota bookkeeping), then in one
   transaction (`WorkQueue.finish`) sets the run's keys to expire after `retain_s` (0 keeps
   them), acknowledges the queue entry and releases the lease. A crash in between is
   harmless: the entry is delivered again and step 1 settles it again (each step is
   idempotent).

A `check_program` hook, when given, inspects every loaded program before it runs (the
daemon re-checks its import allow-list there); a `ProgramError` from it fails the run.
With `retain_s`, the worker also drops expired runs from the listing indexes every
`prune_interval_s` (`RedisStore.prune_index`).

Cancelling: `request_cancel` sets a flag key of the run (`treadle:{run}:cancel`) and
publishes the run id on `treadle:cancel`. Every worker subscribes to that channel and also
polls the flags of its own runs every `cancel_poll_s`, because a message published while
its subscription was down (a Redis restart) is lost.

Shutting down (`stop()`): no more claims; runs in progress get `drain_s` to finish, then
are interrupted without being marked (their leases are released and their queue entries
stay pending, so another worker resumes them from the journal).

Waiting for human input: a run that parks (status `waiting`) is settled for now: its quota
slot is released (`on_settled`) and its queue entry acknowledged; it holds no task, lease or
scheduler slot. An answer (`RunService.answer`) queues it again. A request with a deadline
puts the run in `treadle:input_deadlines`; every worker looks there every `cancel_poll_s`
and queues the runs whose deadline has passed (one worker wins each), so defaults apply.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from treadle.errors import DaemonError
from treadle.graphs.compile import CompiledGraph
from treadle.runtime.core.context import Listener
from treadle.runtime.core.events import Event
from treadle.runtime.core.interceptors import CallInterceptor
from treadle.runtime.core.store import TERMINAL, RunRecord, RunStatus
from treadle.runtime.daemon.live import LiveEvents, first_free_seq
from treadle.runtime.daemon.workqueue import Job, LeaseKeeper, WorkQueue
from treadle.runtime.execution.runtime import RunHandle, Runtime
from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import LeaseLost, RedisKeys, RedisStore, _strs

if TYPE_CHECKING:
    from treadle.backends.base import Backend
    from treadle.runtime.observe.tracing import OtelTracer

__all__ = [
    "ProgramCheck",
    "ProgramError",
    "ProgramLoader",
    "Worker",
    "WorkerOptions",
    "WorkerStats",
    "new_worker_id",
    "request_cancel",
]

log = logging.getLogger(__name__)

#: how long a cancel flag outlives the request (a run still queued after that is unusual)
CANCEL_FLAG_TTL_S = 7 * 24 * 3600


async def request_cancel(redis: Redis, keys: RedisKeys, run_id: str) -> None:
    """Ask whichever worker runs (or will run) `run_id` to cancel it."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.cancel(run_id), b"1", ex=CANCEL_FLAG_TTL_S)
        pipe.publish(keys.cancel_channel(), run_id)
        await pipe.execute()


def new_worker_id() -> str:
    """Unique per process start: a restarted worker must not inherit its predecessor's
    leases (they have to expire so the runs are resumed from their journals)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ProgramError(DaemonError):
    """The run's program cannot be loaded (unknown or invalid definition): the run fails."""


class ProgramLoader(Protocol):
    """Finds the program of a run from its record (`RunRecord.source`)."""

    async def load(self, record: RunRecord) -> CompiledGraph:
        """The compiled graph; raises `ProgramError` when there is none to run. Redis errors
        propagate (the run is then retried later, not failed)."""
        ...


#: called once a run is terminal, or parked to wait for input, before its queue entry is
#: acknowledged
SettledHook = Callable[[RunRecord], Awaitable[None]]
#: called with a run and its loaded program before it runs; raises `ProgramError` to refuse
ProgramCheck = Callable[[RunRecord, CompiledGraph], None]


@dataclass
class WorkerOptions:
    #: runs executed at once by this worker
    concurrency: int = 64
    #: how long one claim waits for a new queue entry (ms)
    block_ms: int = 1000
    #: how often the cancel flags of the runs in progress are polled (s)
    cancel_poll_s: float = 1.0
    #: on `stop()`, how long runs in progress may take to finish before being handed over
    drain_s: float = 30.0
    #: None: `new_worker_id()`
    worker_id: str | None = None
    #: a finished run's keys expire this long after it settles (s); 0 keeps them forever
    retain_s: float = 0.0
    #: with `retain_s`, how often expired runs are dropped from the listing indexes (s)
    prune_interval_s: float = 3600.0
    #: publish every event as it happens (`LiveEvents`); off, the API's event streams see
    #: events only once they are in the journal
    live_events: bool = True
    #: stream LLM answers from backends that can, as `LLMTokens` events
    stream_tokens: bool = False


@dataclass
class WorkerStats:
    claimed: int = 0
    reclaimed: int = 0
    resumed: int = 0
    settled: int = 0
    duplicates: int = 0
    lease_lost: int = 0
    interrupted: int = 0
    retried_later: int = 0
    #: runs that parked to wait for input, and those queued again at a deadline
    parked: int = 0
    deadlines: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass
class _Slot:
    """One run this worker is executing.

    The worker stops a run in one of two ways: `cancel()` (the user asked: the runtime
    records `cancelled`), or `interrupt()` (shutdown, lost lease: the gate refuses the run's
    writes first, so nothing more is recorded and another worker resumes the run from its
    journal). A cancellation from outside interrupts too: the runtime gives an interrupted
    run no terminal status.
    """

    run_id: str
    gate: _Gate
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    handle: RunHandle | None = None
    cancel_requested: bool = False
    interrupted: bool = False

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.handle is not None:
            self.handle.cancel()

    def interrupt(self) -> None:
        if not self.interrupted:
            self.interrupted = True
            self.gate.shut(self.run_id)
            self.scope.cancel()


class RunInterrupted(DaemonError, RuntimeError):
    """The worker stopped this run without ending it; its writes are refused."""


class _Gate:
    """The worker's `StateStore`: its fenced `RedisStore`, except that writes of runs the
    worker has interrupted are refused (`RunInterrupted`), so an interrupted run leaves its
    journal and record as they were."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._closed: set[str] = set()
        #: runs whose terminal (or waiting) status this worker wrote (saves reading the
        #: record back)
        self.settled: dict[str, str] = {}

    def shut(self, run_id: str) -> None:
        self._closed.add(run_id)

    def forget(self, run_id: str) -> None:
        self._closed.discard(run_id)
        self.settled.pop(run_id, None)

    def _check(self, run_id: str) -> None:
        if run_id in self._closed:
            raise RunInterrupted(f"run {run_id!r} was interrupted by this worker")

    async def create_run(self, record: RunRecord) -> None:
        self._check(record.run_id)
        await self.store.create_run(record)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.store.get_run(run_id)

    async def update_run(self, run_id: str, **changes: Any) -> None:
        self._check(run_id)
        await self.store.update_run(run_id, **changes)
        status = changes.get("status")
        if isinstance(status, str) and (status in TERMINAL or status == "waiting"):
            self.settled[run_id] = status

    async def list_runs(
        self, *, tenant: str | None = None, status: RunStatus | None = None, limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:  # fmt: skip
        return await self.store.list_runs(tenant=tenant, status=status, limit=limit, offset=offset)

    async def run_ids_with_prefix(self, prefix: str, *, limit: int = 2) -> list[str]:
        return await self.store.run_ids_with_prefix(prefix, limit=limit)

    async def record(
        self, run_id: str, events: Sequence[Event], outputs: Mapping[str, bytes] | None = None
    ) -> None:
        self._check(run_id)
        await self.store.record(run_id, events, outputs)

    async def load_outputs(self, run_id: str) -> dict[str, bytes]:
        return await self.store.load_outputs(run_id)

    async def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        return await self.store.read_events(run_id, after_seq)

    async def close(self) -> None:
        """The Redis client belongs to the caller."""


def _claim_failed(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("claim failed (%s); retrying in %.1f s", failure, delay)


class Worker:
    """Executes runs from `queue` with `store` (see the module docstring).

    `store` must be a `RedisStore` on the same Redis as `queue`; the worker writes through
    its `fenced` view. `models`, `listeners` and `interceptors` go to the worker's
    `Runtime`.
    """

    def __init__(
        self,
        queue: WorkQueue,
        store: RedisStore,
        loader: ProgramLoader,
        *,
        models: Mapping[str, Backend | Mapping[str, Any]] | None = None,
        listeners: Sequence[Listener] = (),
        interceptors: Sequence[CallInterceptor] = (),
        on_settled: SettledHook | None = None,
        tracer: OtelTracer | None = None,
        options: WorkerOptions | None = None,
        check_program: ProgramCheck | None = None,
        process_slots: anyio.Semaphore | None = None,
    ) -> None:
        self.options = options or WorkerOptions()
        if self.options.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.options.retain_s < 0 or self.options.prune_interval_s <= 0:
            raise ValueError("retain_s must be >= 0 and prune_interval_s > 0")
        self.check_program = check_program
        self._unfenced = store
        self.worker_id = self.options.worker_id or new_worker_id()
        self.queue = queue
        self.keys = store.keys
        self._client = store.client
        self.store = _Gate(store.fenced(self.worker_id))
        self.loader = loader
        self.on_settled = on_settled
        self.tracer = tracer
        all_listeners = list(listeners)
        if tracer is not None:
            all_listeners.append(tracer.listener)
        self.live: LiveEvents | None = None
        if self.options.live_events:
            self.live = LiveEvents(self._client, self.keys, publishes=self._publishes)
            all_listeners.append(self.live.listener)
        self.runtime = Runtime(
            store=self.store,
            models=models,
            stream_tokens=self.options.stream_tokens,
            listeners=all_listeners,
            interceptors=interceptors,
            cache=store,  # tenant-scoped: every key of the result cache holds the tenant
        )
        self.stats = WorkerStats()
        self._slots: dict[str, _Slot] = {}
        self._capacity = anyio.Semaphore(self.options.concurrency)
        #: slots shared by every worker of this process (`--max-concurrent-runs`), if capped
        self._process_slots = process_slots
        #: claiming outlives a Redis outage: tried again, with backoff, until it works
        self._claims = AsyncRetrying(
            retry=retry_if_exception_type((RedisError, OSError)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=_claim_failed,
            sleep=anyio.sleep,
        )
        self._stopping = anyio.Event()
        self._claiming: anyio.CancelScope | None = None
        self._idle: anyio.Event | None = None
        self._stopped = anyio.Event()

    # -- public ------------------------------------------------------------------------

    @property
    def active_runs(self) -> list[str]:
        return list(self._slots)

    def stop(self) -> None:
        """Stop claiming; `run()` returns once the runs in progress are done or handed over
        (after `drain_s`)."""
        self._stopping.set()
        if self._claiming is not None:
            self._claiming.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Claim and execute runs until `stop()` is called (or the task is cancelled)."""
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self._subscribe_cancels)
                services.start_soon(self._poll_cancels)
                services.start_soon(self._poll_deadlines)
                if self.options.retain_s > 0:
                    services.start_soon(self._prune_indexes)
                if self.live is not None:
                    services.start_soon(self.live.run)
                task_status.started()
                log.info(
                    "worker %s started (concurrency %d)", self.worker_id, self.options.concurrency
                )
                async with anyio.create_task_group() as runs:
                    try:
                        await self._claim_loop(runs)
                        await self._drain()
                    except BaseException:
                        # cancelled from outside: the runs are shielded, so stop them here,
                        # unrecorded (they are resumed elsewhere), or this would wait for them
                        self._interrupt_all()
                        raise
                services.cancel_scope.cancel()
        finally:
            self._stopped.set()
            log.info("worker %s stopped: %s", self.worker_id, self.stats)

    # -- claiming ----------------------------------------------------------------------

    async def _claim_loop(self, runs: TaskGroup) -> None:
        while not self._stopping.is_set():
            job: Job | None = None
            with anyio.CancelScope() as self._claiming:
                await self._acquire_slot()  # a free slot first: claim only what we can run
                try:
                    job = await self._claims(
                        self.queue.claim, self.worker_id, block_ms=self.options.block_ms
                    )
                finally:
                    if job is None:  # (a job's task releases the slot when it is done)
                        self._release_slot()
            self._claiming = None
            if job is not None:
                runs.start_soon(self._run_job, job)

    async def _acquire_slot(self) -> None:
        """One of this worker's slots, then one of the process's (when it caps its runs)."""
        await self._capacity.acquire()
        if self._process_slots is not None:
            try:
                await self._process_slots.acquire()
            except BaseException:
                self._capacity.release()
                raise

    def _release_slot(self) -> None:
        if self._process_slots is not None:
            self._process_slots.release()
        self._capacity.release()

    async def _drain(self) -> None:
        if self._slots:
            log.info(
                "worker %s: waiting up to %.0f s for %d runs",
                self.worker_id,
                self.options.drain_s,
                len(self._slots),
            )
            with anyio.move_on_after(self.options.drain_s):
                while self._slots:
                    self._idle = anyio.Event()
                    await self._idle.wait()
        self._interrupt_all()

    def _interrupt_all(self) -> None:
        for slot in list(self._slots.values()):
            # not cancelled by a user: interrupted, and resumed by another worker
            slot.interrupt()

    # -- one run -----------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        try:
            if job.run_id in self._slots:
                # a second queue entry for a run this worker is executing (an enqueue that
                # was retried): the first entry stays pending until that run settles
                self.stats.duplicates += 1
                await self.queue.ack(job)
                return
            self.stats.claimed += 1
            self.stats.reclaimed += job.reclaimed
            slot = _Slot(job.run_id, self.store)
            self._slots[job.run_id] = slot
            try:
                # the lease keeper must not cancel the (shielded) run itself: on a lost
                # lease, `_watch_lease` interrupts it, and the keeper raises LeaseLost
                async with self.queue.keep_lease(
                    job, self.worker_id, cancel_on_loss=False
                ) as lease:
                    error: Exception | None = None
                    async with anyio.create_task_group() as watch:
                        watch.start_soon(_watch_lease, lease, slot)
                        try:
                            with slot.scope:
                                final = await self._execute(slot)
                                if final is not None:
                                    await self._settle(job, final, lease)
                        except Exception as exc:  # raised below, not as an exception group
                            error = exc
                        finally:
                            watch.cancel_scope.cancel()
                    if error is not None:
                        raise error
                    if slot.interrupted and not lease.lost.is_set():
                        self.stats.interrupted += 1
            finally:
                del self._slots[job.run_id]
                self.store.forget(job.run_id)
                if self.live is not None:
                    self.live.forget(job.run_id)
                if not self._slots and self._idle is not None:
                    self._idle.set()
        except LeaseLost as exc:
            # another worker owns the run now; its journal is safe (writes are fenced)
            self.stats.lease_lost += 1
            log.warning("worker %s stopped run %s: %s", self.worker_id, job.run_id, exc)
        except (RedisError, OSError) as exc:
            # the entry stays pending; after `claim_idle_ms` a worker takes it over
            self.stats.retried_later += 1
            log.warning("run %s: Redis error, left for a later retry: %s", job.run_id, exc)
        finally:
            self._release_slot()

    async def _execute(self, slot: _Slot) -> RunRecord | _Gone | None:
        """Run the run to a terminal state; its final record, `_GONE` (no such run: drop
        the entry), or None (not terminal: leave the entry pending)."""
        run_id = slot.run_id
        state = await self._read_state(run_id)
        record, last_seq, flagged = state.record, state.last_seq, state.flagged
        if record is None:
            log.error("queue entry for run %s, which does not exist: dropping it", run_id)
            return _GONE
        if record.status in TERMINAL or record.status == "waiting":
            # done, or parked until an answer (or a deadline) queues it again
            return record
        if flagged:
            await self.store.update_run(
                run_id, status="cancelled", error="cancelled before it started"
            )
            return await self.store.get_run(run_id)
        try:
            cg = await self.loader.load(record)
            if self.check_program is not None:
                self.check_program(record, cg)
        except ProgramError as exc:
            await self.store.update_run(
                run_id, status="failed", error=f"cannot load the program: {exc}"
            )
            return await self.store.get_run(run_id)
        resume = last_seq > 0
        if resume:
            self.stats.resumed += 1  # (the runtime marks a resumed run `running`)
        else:
            # one round trip: the record read above is the one compared and set
            await self.store.update_run(run_id, known=state.raw, status="running")
        self._set_trace_parent(record)
        after = first_free_seq(last_seq, state.live_seq, state.last_event)
        if self.live is not None:
            self.live.start(run_id, after + 1)
        try:
            async with self.runtime.open_run(cg, record, resume=resume, min_seq=after) as handle:
                handle._release()  # a run that parks is settled for now (see above)
                slot.handle = handle
                if slot.cancel_requested:
                    handle.cancel()
                result = await handle.result()
        except (RedisError, OSError, LeaseLost, RunInterrupted):
            raise
        except Exception as exc:
            # e.g. inputs that no longer validate: fail the run rather than retry it forever
            log.exception("run %s could not be executed", run_id)
            await self.store.update_run(
                run_id, status="failed", error=f"internal error: {type(exc).__name__}: {exc}"
            )
            return await self.store.get_run(run_id)
        status = self.store.settled.get(run_id)
        if status is not None:
            # the runtime recorded the end: the record is what we had, with its new status
            update = {"status": status, "error": result.error, "pending_inputs": result.pending}
            return record.model_copy(update=update)
        final = await self.store.get_run(run_id)
        if final is None or final.status not in TERMINAL:
            owner = await self.queue.lease_owner(run_id)
            if owner != self.worker_id:
                # the journal refused a write (fenced): the run belongs to `owner` now
                raise LeaseLost(f"run {run_id!r}: the lease is held by {owner!r}")
            # the runtime could not record the end (a store error): resume later
            log.warning("run %s ended as %s but is not recorded as terminal", run_id, result.status)
            return None
        return final

    async def _settle(self, job: Job, final: RunRecord | _Gone, lease: LeaseKeeper) -> None:
        expire: list[str] = []
        if isinstance(final, RunRecord):
            if self.on_settled is not None:
                await self.on_settled(final)
            if final.status == "waiting":
                await self._parked(final)
            elif self.options.retain_s > 0:
                expire = self._unfenced.keys.run_keys(final.run_id)[:3]  # not the lease
            self.stats.settled += 1
            self.stats.by_status[final.status] = self.stats.by_status.get(final.status, 0) + 1
        # the ack, the lease and the retention, in one round trip
        await self.queue.finish(
            job, self.worker_id, expire=expire, expire_ms=int(self.options.retain_s * 1000)
        )
        lease.released = True

    async def _parked(self, record: RunRecord) -> None:
        """A run parked for input: remember when its first request expires."""
        self.stats.parked += 1
        deadlines = [r.expires_at for r in record.pending_inputs if r.expires_at is not None]
        if deadlines:
            await self._client.zadd(self.keys.input_deadlines(), {record.run_id: min(deadlines)})

    async def _poll_deadlines(self) -> None:
        """Queue waiting runs whose request has expired, so its default applies."""
        key = self.keys.input_deadlines()
        while True:
            await anyio.sleep(self.options.cancel_poll_s)
            try:
                due = _strs(await self._client.zrangebyscore(key, "-inf", time.time(), 0, 100))
                for run_id in due:
                    if not await self._client.zrem(key, run_id):
                        continue  # another worker took it
                    record = await self._unfenced.get_run(run_id)
                    if record is not None and record.status == "waiting":
                        await self._unfenced.update_run(run_id, status="pending")
                        await self.queue.enqueue(run_id)
                        self.stats.deadlines += 1
            except (RedisError, OSError) as exc:
                log.warning("polling input deadlines failed: %s", exc)

    async def _read_state(self, run_id: str) -> _RunState:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.meta(run_id), ["data", "last_seq", "live_seq"])
            pipe.exists(self.keys.cancel(run_id))
            pipe.xrevrange(self.keys.events(run_id), "+", "-", count=1)
            (raw, last_seq, live_seq), flagged, tail = await pipe.execute()
        record = codec.decode_record(raw) if raw is not None else None
        last_event = codec.decode_event(tail[0][1][b"e"]) if tail else None
        return _RunState(
            record, raw, int(last_seq or 0), int(live_seq or 0), last_event, bool(flagged)
        )

    def _publishes(self, run_id: str) -> bool:
        """Whether the run's live events are this worker's to write (`LiveEvents`)."""
        slot = self._slots.get(run_id)
        return slot is not None and not slot.interrupted

    def _set_trace_parent(self, record: RunRecord) -> None:
        parent = record.meta.get("traceparent")
        if self.tracer is None or not parent:
            return
        try:
            self.tracer.set_parent(record.run_id, parent, record.meta.get("tracestate"))
        except ValueError as exc:
            log.warning("run %s: ignoring its trace parent: %s", record.run_id, exc)

    async def _prune_indexes(self) -> None:
        while True:
            try:
                cutoff = time.time() - self.options.retain_s
                removed = await self._unfenced.prune_index(cutoff)
                if removed:
                    log.info("dropped %d expired runs from the listing indexes", removed)
            except (RedisError, OSError) as exc:
                log.warning("pruning the run indexes failed (retried later): %s", exc)
            await anyio.sleep(self.options.prune_interval_s)

    # -- cancellation ------------------------------------------------------------------

    def _cancel(self, run_id: str) -> None:
        slot = self._slots.get(run_id)
        if slot is not None and not slot.cancel_requested:
            log.info("worker %s: cancelling run %s", self.worker_id, run_id)
            slot.cancel()

    async def _subscribe_cancels(self) -> None:
        """Cancel requests, and event streams asking for the live events they missed."""
        cancels, replays = self.keys.cancel_channel(), self.keys.replay_channel()
        failures = 0
        while True:
            try:
                async for channel, run_id in _messages(self._client, cancels, replays):
                    failures = 0
                    if channel == cancels:
                        self._cancel(run_id)
                    else:
                        self._replay(run_id)
            except (RedisError, OSError) as exc:
                failures += 1
                delay = min(0.1 * 2**failures, 5.0)
                log.warning("cancel subscription lost (%s); again in %.1f s", exc, delay)
                await anyio.sleep(delay)

    def _replay(self, run_id: str) -> None:
        slot = self._slots.get(run_id)
        if self.live is not None and slot is not None and slot.handle is not None:
            self.live.replay(run_id, slot.handle.undurable_events())

    async def _poll_cancels(self) -> None:
        while True:
            await anyio.sleep(self.options.cancel_poll_s)
            ids = [rid for rid, slot in self._slots.items() if not slot.cancel_requested]
            if not ids:
                continue
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for rid in ids:
                        pipe.exists(self.keys.cancel(rid))
                    flags = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("polling cancel flags failed: %s", exc)
                continue
            for rid, flagged in zip(ids, flags, strict=True):
                if flagged:
                    self._cancel(rid)


async def _watch_lease(lease: LeaseKeeper, slot: _Slot) -> None:
    await lease.lost.wait()
    slot.interrupt()


@dataclass(frozen=True, slots=True)
class _RunState:
    """What a worker reads of a run before it executes it (one round trip)."""

    record: RunRecord | None
    #: the record's JSON as read (compared when the record is set `running`)
    raw: bytes | None
    #: the journal's last seq and event, and the highest seq reserved for live events
    last_seq: int
    live_seq: int
    last_event: Event | None
    flagged: bool


class _Gone:
    """The queue entry names a run that does not exist."""


_GONE = _Gone()


async def _messages(client: Redis, *channels: str) -> AsyncIterator[tuple[str, str]]:
    """(channel, message) of what is published on `channels`."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(*channels)
        async for message in pubsub.listen():
            if message.get("type") == "message":
                yield _text(message["channel"]), _text(message["data"])
    finally:
        with anyio.CancelScope(shield=True):
            await pubsub.aclose()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
