"""Runs as a tenant sees them: submit, read, list, cancel, answer — each scoped to its
tenant.

A run id that belongs to another tenant is answered exactly like one that does not exist
(`NotFound`, the same message), so ids of other tenants cannot even be confirmed.

Submitting validates the inputs against the registered workflow, checks the tenant's
quotas, and writes the run record (`pending`) and its queue entry in one transaction.
A worker marks a run `running` when it starts it (`RunView.status` also reports a `pending`
record with a journal as `running`, as workers of earlier versions left it). Cancelling
sets the run's cancel flag (`request_cancel`): the worker running the run stops it, and a
worker that claims a flagged run that has not started marks it cancelled instead.

Answering (`answer`) records a person's input for a `waiting` run
(`treadle.runtime.execution.inputs.record_input`: checked against the request, idempotent
on the client's key) and queues the run again. A waiting run does not count against its
tenant's concurrent runs (its worker released it when it parked); an answer re-admits it
first, so a tenant at its limit gets 429 and nothing is recorded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis

from treadle.errors import DaemonError
from treadle.runtime.core.store import TERMINAL, RunRecord, RunStatus
from treadle.runtime.daemon.quotas import Quotas
from treadle.runtime.daemon.registry import SOURCE_PREFIX, WorkflowRegistry, source_of
from treadle.runtime.daemon.tenants import Tenant
from treadle.runtime.daemon.worker import ProgramError, request_cancel
from treadle.runtime.execution.inputs import (
    InputConflict,
    InputRejected,
    InputResult,
    record_input,
)
from treadle.runtime.execution.runtime import InvalidInputs
from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import RedisStore

RUN_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
#: index entries looked at by one list request at most (then a cursor to go on)
_SCAN_BUDGET = 2000
_CHUNK = 200
#: a search by id prefix: index entries Redis looks at per round trip, and matches kept
_PREFIX_SCAN = 1000
_PREFIX_MAX = 1000


class NotFound(DaemonError, LookupError):
    """No such run or workflow for this tenant."""


class Conflict(DaemonError, ValueError):
    """The request does not fit the run's state (e.g. cancelling a finished run)."""


class InvalidRequest(DaemonError, ValueError):
    """A request that is well formed but not acceptable (bad inputs, bad cursor)."""


@dataclass(frozen=True)
class RunView:
    record: RunRecord
    cancel_requested: bool = False
    #: the journal has events (`last_seq` > 0)
    started: bool = False

    @property
    def status(self) -> RunStatus:
        """The status to report: a `pending` record with a journal is running (workers
        of earlier versions left a fresh run's record `pending` until it ended)."""
        if self.record.status == "pending" and self.started:
            return "running"
        return self.record.status


@dataclass(frozen=True)
class RunPage:
    runs: list[RunView]
    next_cursor: str | None


class RunService:
    def __init__(
        self,
        redis: Redis,
        store: RedisStore,
        registry: WorkflowRegistry,
        quotas: Quotas,
    ) -> None:
        self.redis = redis
        self.store = store
        self.registry = registry
        self.quotas = quotas
        self.keys = store.keys

    async def submit(
        self,
        tenant: Tenant,
        workflow: str,
        inputs: Mapping[str, Any],
        meta: Mapping[str, str] | None = None,
        *,
        version: int | None = None,
    ) -> RunRecord:
        if version is None:
            info = await self.registry.get(tenant.id, workflow)
        else:
            info = await self.registry.version(tenant.id, workflow, version)
        if info is None:
            which = "" if version is None else f" version {version}"
            raise NotFound(f"workflow {workflow!r}{which} not found")
        bad = unstorable(inputs)
        if bad is not None:
            where, why = bad
            raise InvalidRequest(f"inputs.{where}: {why}")
        try:
            graph, validated = await self.registry.validate_inputs(info.digest, inputs)
        except InvalidInputs as exc:
            raise InvalidRequest(str(exc)) from None
        await self.quotas.check_tokens(tenant)
        run_id = uuid.uuid4().hex
        await self.quotas.admit_run(tenant, run_id)
        record = RunRecord(
            run_id=run_id,
            graph=graph,
            status="pending",
            tenant=tenant.id,
            inputs=validated,
            source=source_of(info.digest),
            meta={**(meta or {}), "workflow_version": str(info.version)},
        )
        try:
            await self._create_and_enqueue(record)
        except BaseException:
            with anyio.CancelScope(shield=True):
                # best effort: the caller sees the error; the slot is not held for nothing
                with contextlib.suppress(Exception):
                    await self.quotas.release_run(tenant.id, run_id)
            raise
        return record

    async def _create_and_enqueue(self, record: RunRecord) -> None:
        """The run's record and index entries, laid out as `RedisStore.create_run` writes
        them, and its queue entry, as `WorkQueue.enqueue` writes it, in ONE MULTI/EXEC.

        Atomic: a crash between separate round trips could leave a run that no worker will
        ever take; and one round trip instead of four (submitting is the API's hot path).
        tests/daemon/test_api.py checks that the store and the queue read what this writes.
        (On Redis Cluster the keys of one transaction must share a slot; this would then be
        split, like `create_run`'s own pipeline.)
        """
        assert record.tenant is not None
        keys = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.meta(record.run_id), "data", codec.encode_record(record))
            pipe.zadd(keys.runs(), {record.run_id: record.created_at})
            pipe.zadd(keys.tenant_runs(record.tenant), {record.run_id: record.created_at})
            pipe.xadd(keys.queue(), {"run": record.run_id, "payload": codec.dumps({})})
            await pipe.execute()

    async def get(self, tenant: Tenant, run_id: str) -> RunView:
        if not RUN_ID.fullmatch(run_id):
            raise NotFound(f"run {run_id!r} not found")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.meta(run_id), ["data", "last_seq"])
            pipe.exists(self.keys.cancel(run_id))
            (raw, last_seq), flagged = await pipe.execute()
        record = codec.decode_record(raw) if raw is not None else None
        if record is None or record.tenant != tenant.id:
            raise NotFound(f"run {run_id!r} not found")
        return RunView(record, bool(flagged), started=int(last_seq or 0) > 0)

    async def cancel(self, tenant: Tenant, run_id: str) -> RunView:
        view = await self.get(tenant, run_id)
        if view.record.status in TERMINAL:
            raise Conflict(f"run {run_id!r} has finished already ({view.record.status})")
        await request_cancel(self.redis, self.keys, run_id)
        return RunView(view.record, True, view.started)

    async def answer(
        self,
        tenant: Tenant,
        run_id: str,
        value: Any,
        *,
        node: str | None = None,
        key: str | None = None,
    ) -> tuple[InputResult, RunView]:
        """Record the answer to a waiting run's request and queue the run to go on. Raises
        `NotFound`, `InvalidRequest` (the answer does not fit), `Conflict` (not waiting for
        it), or `QuotaExceeded`."""
        view = await self.get(tenant, run_id)
        record = view.record
        if record.status in TERMINAL:
            raise Conflict(f"run {run_id!r} has finished already ({record.status})")
        bad = unstorable(value)
        if bad is not None:
            where, why = bad
            raise InvalidRequest(f"value.{where}: {why}")
        source = record.source or ""
        if not source.startswith(SOURCE_PREFIX):
            raise Conflict(f"run {run_id!r} was not submitted from a registered workflow")
        digest = source[len(SOURCE_PREFIX) :]

        async def check(at: str, answer: Any) -> Any:
            # in the definition checker's process: no definition is loaded on the API's loop
            try:
                return await self.registry.check_answer(digest, at, answer)
            except ProgramError as exc:
                raise Conflict(f"run {run_id!r}: its workflow cannot be loaded: {exc}") from None

        await self.quotas.admit_run(tenant, run_id)
        resumed = False
        try:
            try:
                result = await record_input(
                    self.store, check, run_id, value, node=node, key=key, record=record
                )
            except InputRejected as exc:
                raise InvalidRequest(str(exc)) from None
            except InputConflict as exc:
                raise Conflict(str(exc)) from None
            if not result.replayed and record.status == "waiting":
                await self.store.update_run(run_id, status="pending")
                await self.redis.xadd(
                    self.keys.queue(), {"run": run_id, "payload": codec.dumps({})}
                )
                resumed = True
        finally:
            if not resumed:  # nothing to run: the slot goes back
                with anyio.CancelScope(shield=True):
                    await self.quotas.release_run(tenant.id, run_id)
        return result, await self.get(tenant, run_id)

    async def list_runs(
        self,
        tenant: Tenant,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        id_prefix: str | None = None,
    ) -> RunPage:
        """Newest first. The cursor is the position of the last run of the previous page,
        so runs submitted meanwhile do not shift the pages. With `id_prefix`, only runs
        whose id starts with it, on one page (`_find`)."""
        index = self.keys.tenant_runs(tenant.id)
        if id_prefix is not None:
            return await self._find(tenant, index, id_prefix, status, workflow, limit)
        position = _decode_cursor(cursor) if cursor else None
        out: list[RunView] = []
        scanned = 0
        while scanned < _SCAN_BUDGET:
            entries = await self._entries_after(index, position, _CHUNK)
            if not entries:
                return RunPage(out, None)
            scanned += len(entries)
            for (run_id, score), view in zip(
                entries, await self._views(tenant, index, entries), strict=True
            ):
                position = (score, run_id)
                if view is None or not _matches(view, status, workflow):
                    continue
                out.append(view)
                if len(out) == limit:
                    return RunPage(out, _encode_cursor(position))
        # the scan budget is spent: the client goes on from here
        return RunPage(out, _encode_cursor(position) if position else None)

    async def _find(
        self,
        tenant: Tenant,
        index: str,
        prefix: str,
        status: RunStatus | None,
        workflow: str | None,
        limit: int,
    ) -> RunPage:
        """The tenant's runs whose id starts with `prefix`, newest first. Redis matches the
        ids (ZSCAN MATCH, `_PREFIX_SCAN` index entries per round trip); a prefix that
        matches more than `_PREFIX_MAX` runs gives the newest of the first that many."""
        if not RUN_ID.fullmatch(prefix):
            raise InvalidRequest(f"id_prefix {prefix!r}: letters, digits, _ and - only")
        found: list[tuple[str, float]] = []
        async for member, score in self.redis.zscan_iter(
            index, match=f"{prefix}*", count=_PREFIX_SCAN
        ):
            found.append((_text(member), float(score)))
            if len(found) >= _PREFIX_MAX:
                break
        found.sort(key=lambda entry: (entry[1], entry[0]), reverse=True)
        out: list[RunView] = []
        for start in range(0, len(found), _CHUNK):
            chunk = found[start : start + _CHUNK]
            for view in await self._views(tenant, index, chunk):
                if view is not None and _matches(view, status, workflow):
                    out.append(view)
                    if len(out) == limit:
                        return RunPage(out, None)
        return RunPage(out, None)

    async def _views(
        self, tenant: Tenant, index: str, entries: list[tuple[str, float]]
    ) -> list[RunView | None]:
        """The tenant's runs of index `entries` (None: gone, or not the tenant's); ids of
        expired runs (retention) are dropped from the indexes as they are met."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id, _score in entries:
                pipe.hmget(self.keys.meta(run_id), ["data", "last_seq"])
            metas = await pipe.execute()
        gone = [run_id for (run_id, _s), (raw, _l) in zip(entries, metas, strict=True)
                if raw is None]  # fmt: skip
        if gone:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(index, *gone)
                pipe.zrem(self.keys.runs(), *gone)
                await pipe.execute()
        views: list[RunView | None] = []
        for raw, last_seq in metas:
            view = None
            if raw is not None:
                view = RunView(codec.decode_record(raw), started=int(last_seq or 0) > 0)
                if view.record.tenant != tenant.id:
                    view = None
            views.append(view)
        return views

    async def _entries_after(
        self, index: str, position: tuple[float, str] | None, count: int
    ) -> list[tuple[str, float]]:
        """Up to `count` index entries after `position`, newest first. Entries with the
        same score come in reverse id order (ZREVRANGEBYSCORE), so ties are skipped by id."""
        if position is None:
            first: Any = await self.redis.zrevrange(index, 0, count - 1, withscores=True)
            return [(_text(m), float(s)) for m, s in first]
        score, last_id = position
        want = count
        while True:
            raw: Any = await self.redis.zrevrangebyscore(
                index, max=score, min="-inf", start=0, num=want, withscores=True
            )
            entries = [(_text(m), float(s)) for m, s in raw]
            fresh = [(m, s) for m, s in entries if not (s == score and m >= last_id)]
            if fresh or len(entries) < want:
                return fresh[:count]
            want *= 2  # a page of ties only: look further


def _matches(view: RunView, status: RunStatus | None, workflow: str | None) -> bool:
    return (status is None or view.status == status) and (
        workflow is None or view.record.graph == workflow
    )


def unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, why) for the first part of `value` that the run's record cannot hold, or None.

    Python's JSON parser takes NaN and Infinity, and `\\ud800` escapes that decode to lone
    surrogates; JSON has no such numbers, and a lone surrogate is not Unicode text (it
    cannot be encoded as UTF-8), while the record, and every API answer about it, is JSON
    in UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(value)", "NaN and Infinity are not JSON numbers"
    if isinstance(value, str):
        return _surrogate(value, path)
    if isinstance(value, Mapping):
        for key, item in value.items():
            at = f"{path}.{key}" if path else str(key)
            found = _surrogate(str(key), at, "key") or unstorable(item, at)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = unstorable(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _surrogate(text: str, path: str, what: str = "text") -> tuple[str, str] | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        where = path.encode("utf-8", "backslashreplace").decode("utf-8") or "(value)"
        return where, (
            f"the {what} holds a lone surrogate (\\u{ord(char):04x}) at character {exc.start}, "
            "which is not Unicode text (it cannot be encoded as UTF-8)"
        )
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode_cursor(position: tuple[float, str]) -> str:
    score, run_id = position
    return base64.urlsafe_b64encode(f"{score!r}|{run_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, run_id = text.split("|", 1)
        value = float(score)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest(f"cursor {cursor!r} is not one this API returned") from None
    if not RUN_ID.fullmatch(run_id) or value != value:
        raise InvalidRequest(f"cursor {cursor!r} is not one this API returned")
    return value, run_id
