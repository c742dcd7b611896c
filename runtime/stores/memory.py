"""The in-memory `StateStore`: the SDK's and the tests' default. Nothing survives the
process, but it keeps the same journal discipline as the durable stores. It is also a
`ResultCache` (bounded: the least recently used entries go first)."""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from treadle.runtime.core.events import Event
from treadle.runtime.core.store import RunNotFound, RunRecord, RunStatus
from treadle.runtime.stores.codec import apply_changes, check_batch, check_outputs, check_page


class MemoryStore:
    #: nothing survives the process, so runs may write their journal here in batches
    durable = False

    def __init__(self, *, cache_entries: int = 10_000) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._events: dict[str, list[Event]] = {}
        self._outputs: dict[str, dict[str, bytes]] = {}
        #: key -> (value, expiry on the monotonic clock or None), least recently used first
        self._cache: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._cache_entries = cache_entries

    async def create_run(self, record: RunRecord) -> None:
        self._runs[record.run_id] = record.model_copy()
        self._events.setdefault(record.run_id, [])
        self._outputs.setdefault(record.run_id, {})

    async def get_run(self, run_id: str) -> RunRecord | None:
        rec = self._runs.get(run_id)
        return rec.model_copy() if rec is not None else None

    async def update_run(self, run_id: str, **changes: Any) -> None:
        rec = self._runs.get(run_id)
        if rec is None:
            raise RunNotFound(run_id)
        self._runs[run_id] = apply_changes(rec, changes)

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:
        check_page(limit, offset)
        runs = [
            r
            for r in self._runs.values()
            if (tenant is None or r.tenant == tenant) and (status is None or r.status == status)
        ]
        runs.sort(key=lambda r: r.created_at, reverse=True)
        return [r.model_copy() for r in runs[offset : offset + limit]]

    async def run_ids_with_prefix(self, prefix: str, *, limit: int = 2) -> list[str]:
        return [r for r in self._runs if r.startswith(prefix)][:limit]

    async def record(
        self, run_id: str, events: Sequence[Event], outputs: Mapping[str, bytes] | None = None
    ) -> None:
        if run_id not in self._runs:
            raise RunNotFound(run_id)
        journal = self._events[run_id]
        # the same journal rules as the durable stores, so a bug shows up in memory too
        check_batch(events, journal[-1].seq if journal else None)
        if outputs:
            self._outputs[run_id].update(check_outputs(outputs))
        journal.extend(events)

    async def load_outputs(self, run_id: str) -> dict[str, bytes]:
        return dict(self._outputs.get(run_id, {}))

    async def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        events = self._events.get(run_id, [])
        if not events or after_seq <= 0:
            return list(events)
        # seqs strictly increase, so bisect rather than assume they are dense
        return events[bisect.bisect_right(events, after_seq, key=lambda e: e.seq) :]

    async def cache_get(self, key: str) -> bytes | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and time.monotonic() >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return value

    async def cache_put(self, key: str, value: bytes, ttl_s: float | None) -> None:
        expires = time.monotonic() + ttl_s if ttl_s is not None else None
        self._cache[key] = (bytes(value), expires)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        return None
