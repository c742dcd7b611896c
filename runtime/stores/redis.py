"""`RedisStore`: the `StateStore` of the daemon and of workers on several machines.

Layout (`prefix` defaults to "treadle"; every key of one run carries the hash tag `{run_id}`,
so all of them live in one Redis Cluster slot and one script may touch them together):

- `treadle:{run}:meta`   hash: `data` = the `RunRecord` as JSON, `last_seq` = the journal's
  last event seq;
- `treadle:{run}:out`    hash: node instance id -> output JSON bytes;
- `treadle:{run}:events` stream: one entry per event, entry id `<seq>-0`, field `e` = JSON;
- `treadle:{run}:live`   the Pub/Sub channel of the run's events as they happen, before they
  are durable (`treadle.runtime.daemon.live`; the meta field `live_seq` is the highest seq
  its worker reserved for it);
- `treadle:lease:{run}`  the run's lease (see `treadle.runtime.daemon.workqueue`);
- `treadle:runs`         sorted set of all run ids by `created_at` (the listing index), and
  `treadle:tenant:<tenant>:runs` the same per tenant. These are not keys *of a run* (they
  span runs), so they are written after the run's meta, in a separate round trip.
- `treadle:input_deadlines`  sorted set: waiting runs by the earliest time one of their
  requests for human input expires (the daemon's workers queue them then, so that the
  requests' defaults apply);
- `treadle:cache:<key>`  a node's cached output (`ResultCache`), expiring with its TTL (the
  key is a digest that includes the tenant).

Retention: `expire_run` sets one time to live on a finished run's keys (the daemon's worker
does it when a run settles, `--retain-days`). The listing indexes cannot expire entry by
entry, so an id whose meta is gone is dropped from them when a listing meets it, and
`prune_index` drops such ids from every index (workers call it periodically).

`record` is ONE Lua script (EVALSHA: one round trip, executed atomically like MULTI/EXEC)
rather than a MULTI/EXEC block, because it must refuse before writing anything when the run
does not exist, when the batch does not continue the journal, or (for a `fenced` store) when
the caller no longer holds the run's lease, and MULTI/EXEC cannot branch. The script is also
idempotent: a batch that is already in the journal, byte for byte (a client retry after a
lost reply), is accepted without writing it twice.

Durability is the server's: with `appendonly yes` and `appendfsync always` a reply is sent
only after the write is fsynced to the append-only file; with `everysec` up to a second of
acknowledged writes can be lost in a crash of the server machine.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, ResponseError

from treadle.errors import StoreError
from treadle.runtime.core.events import Event
from treadle.runtime.core.store import MAX_SEQ, RunNotFound, RunRecord, RunStatus
from treadle.runtime.stores import codec

_MAX_BATCH = 256  # record calls sent in one pipeline at most
_EVENTS_PAGE = 1000  # XRANGE page size for read_events
_SCAN_CHUNK = 200  # index entries fetched per round trip when list_runs filters by status


def connect(url: str, *, max_connections: int = 64) -> Redis:
    """A client for `url` for the stores and the work queue.

    - Its pool makes a caller wait for a free connection when `max_connections` are busy
      (redis-py's default pool fails at once instead, which a fan-out of a thousand nodes
      finishing together would hit).
    - It retries a command on connection errors for a few seconds, long enough to ride out
      a Redis restart. Every write of this module is safe to repeat: `record` recognises a
      batch it already stored, the other writes are idempotent or compare-and-set, and the
      work queue is at-least-once anyway.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,  # wait for a connection as long as it takes; callers set deadlines
        decode_responses=False,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=6),
    )
    return Redis.from_pool(pool)


def adopt_client(url_or_client: str | Redis, user: str) -> tuple[Redis, bool]:
    """A client from a URL (made by `connect`, owned by the caller: True) or an existing one
    (owned by whoever made it: False), which must return bytes (`decode_responses=False`)."""
    if isinstance(url_or_client, str):
        return connect(url_or_client), True
    kwargs = getattr(url_or_client.connection_pool, "connection_kwargs", {})
    if kwargs.get("decode_responses"):
        raise ValueError(f"{user} needs a client with decode_responses=False")
    return url_or_client, False


class LeaseLost(StoreError, RuntimeError):
    """This worker no longer holds the run's lease: another worker may be running it."""


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The key layout, in one place (the store and the work queue share it)."""

    prefix: str = "treadle"

    def meta(self, run_id: str) -> str:
        return f"{self.prefix}:{{{run_id}}}:meta"

    def outputs(self, run_id: str) -> str:
        return f"{self.prefix}:{{{run_id}}}:out"

    def events(self, run_id: str) -> str:
        return f"{self.prefix}:{{{run_id}}}:events"

    def lease(self, run_id: str) -> str:
        return f"{self.prefix}:lease:{{{run_id}}}"

    def live(self, run_id: str) -> str:
        """The Pub/Sub channel of the run's live events (a channel, not a key)."""
        return f"{self.prefix}:{{{run_id}}}:live"

    def runs(self) -> str:
        return f"{self.prefix}:runs"

    def tenant_runs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:runs"

    def queue(self) -> str:
        return f"{self.prefix}:queue"

    def cancel(self, run_id: str) -> str:
        """The run's cancel flag (short-lived: not one of `run_keys`)."""
        return f"{self.prefix}:{{{run_id}}}:cancel"

    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    def replay_channel(self) -> str:
        """Where an event stream that starts asks a run's worker for the run's events that
        are not in the journal yet (`treadle.runtime.daemon.live`)."""
        return f"{self.prefix}:live:replay"

    def cache(self, key: str) -> str:
        return f"{self.prefix}:cache:{key}"

    def input_deadlines(self) -> str:
        return f"{self.prefix}:input_deadlines"

    def run_keys(self, run_id: str) -> list[str]:
        """Every key that belongs to one run (all share the `{run_id}` hash tag)."""
        return [self.meta(run_id), self.outputs(run_id), self.events(run_id), self.lease(run_id)]


# KEYS: meta, out, events, lease.  ARGV: fence owner ('' = none), number of events n,
# then n pairs (seq, event JSON), then pairs (node, output bytes).
_RECORD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('TREADLE_NORUN')
end
if ARGV[1] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[1] then
  return redis.error_reply('TREADLE_LEASE')
end
local n = tonumber(ARGV[2])
local i = 3
if n > 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
  local first = tonumber(ARGV[3])
  if first <= last then
    -- a retried batch that is already stored, entry for entry, is not an error
    local stored = redis.call('XRANGE', KEYS[3], ARGV[3] .. '-0', ARGV[1 + 2 * n] .. '-0')
    local same = #stored == n
    for k = 1, n do
      if not same then break end
      local entry = stored[k]
      same = entry[1] == ARGV[1 + 2 * k] .. '-0' and entry[2][2] == ARGV[2 + 2 * k]
    end
    if not same then
      return redis.error_reply('TREADLE_SEQ ' .. last)
    end
    return 0
  end
  for k = 1, n do
    redis.call('XADD', KEYS[3], ARGV[i] .. '-0', 'e', ARGV[i + 1])
    i = i + 2
  end
  redis.call('HSET', KEYS[1], 'last_seq', ARGV[i - 2])
end
while i <= #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return n
"""

_RECORD_SHA = hashlib.sha1(_RECORD_LUA.encode()).hexdigest()

# KEYS: meta, lease.  ARGV: the record JSON read before, the new JSON, fence owner ('' = none).
# Compare-and-set, so two concurrent update_run calls never lose one another's change.
_UPDATE_LUA = """
local cur = redis.call('HGET', KEYS[1], 'data')
if not cur then
  return redis.error_reply('TREADLE_NORUN')
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return redis.error_reply('TREADLE_LEASE')
end
if cur ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'data', ARGV[2])
return 1
"""


class RedisStore:
    """A `StateStore` on Redis (redis-py asyncio).

    `url_or_client` is a URL (`redis://host:6379/0`; the store owns that client and closes
    it) or an existing `redis.asyncio.Redis` made with `decode_responses=False` (outputs are
    bytes), which the caller keeps and closes.
    """

    def __init__(
        self,
        url_or_client: str | Redis,
        *,
        prefix: str = "treadle",
    ) -> None:
        self._redis, self._owns_client = adopt_client(url_or_client, "RedisStore")
        if not prefix:
            raise ValueError("prefix must not be empty")
        self.keys = RedisKeys(prefix)
        self._fence: str | None = None
        # group commit: record calls that arrive while one is in flight go out together
        self._pending: list[_PendingRecord] = []
        self._send_lock = anyio.Lock()
        self._update_script = self._redis.register_script(_UPDATE_LUA)

    @property
    def client(self) -> Redis:
        return self._redis

    def fenced(self, owner: str) -> RedisStore:
        """A view of this store whose `record` and `update_run` succeed only while `owner`
        holds the run's lease (`treadle:lease:{run}`), checked atomically with the write;
        otherwise they raise `LeaseLost` and write nothing. A worker writes through it so
        that, once its lease has passed to another worker, it cannot add to the journal.
        """
        if not owner:
            raise ValueError("owner must not be empty")
        view = copy.copy(self)
        view._fence = owner
        view._owns_client = False  # closing the view must not close the shared client
        return view

    # -- StateStore ------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> None:
        _check_run_id(record.run_id)
        data = codec.encode_record(record)
        meta = self.keys.meta(record.run_id)
        old_raw = await self._redis.hget(meta, "data")
        old = codec.decode_record(old_raw) if old_raw is not None else None
        # meta first, index after: an index entry always points at a run that exists
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(meta, "data", data)
            pipe.zadd(self.keys.runs(), {record.run_id: record.created_at})
            if old is not None and old.tenant is not None and old.tenant != record.tenant:
                pipe.zrem(self.keys.tenant_runs(old.tenant), record.run_id)
            if record.tenant is not None:
                pipe.zadd(self.keys.tenant_runs(record.tenant), {record.run_id: record.created_at})
            await pipe.execute()

    async def expire_run(self, run_id: str, seconds: float) -> None:
        """Let the run's meta, outputs and journal expire `seconds` from now, together (one
        MULTI/EXEC; the keys share the run's hash tag). A key that does not exist (a run
        without outputs) is skipped by Redis. Idempotent: calling it again restarts the clock.
        """
        _check_run_id(run_id)
        ms = int(seconds * 1000)
        if ms < 1:
            raise ValueError(f"seconds must be > 0, not {seconds!r}")
        async with self._redis.pipeline(transaction=True) as pipe:
            for key in self.keys.run_keys(run_id)[:3]:  # meta, outputs, events (not the lease)
                pipe.pexpire(key, ms)
            await pipe.execute()

    async def prune_index(self, older_than: float, *, batch: int = 500) -> int:
        """Drop, from the listing indexes (all runs and every tenant's), the ids created
        before `older_than` (epoch seconds) whose meta no longer exists (expired, deleted);
        returns how many entries were removed. Only the expired are removed, never an old
        run that is still kept. Safe to run from several workers at once."""
        removed = 0
        indexes = [self.keys.runs()]
        pattern = f"{self.keys.prefix}:tenant:*:runs"
        async for key in self._redis.scan_iter(match=pattern, count=500, _type="zset"):
            indexes.append(_str(key))
        for index in indexes:
            start = 0
            while True:
                ids = _strs(
                    await self._redis.zrangebyscore(
                        index, "-inf", f"({older_than!r}", start=start, num=batch
                    )
                )
                if not ids:
                    break
                gone = await self._missing(ids)
                if gone:
                    removed += int(await self._redis.zrem(index, *gone))
                if len(ids) < batch:
                    break
                start += len(ids) - len(gone)
        return removed

    async def get_run(self, run_id: str) -> RunRecord | None:
        raw = await self._redis.hget(self.keys.meta(run_id), "data")
        return codec.decode_record(raw) if raw is not None else None

    async def update_run(self, run_id: str, *, known: bytes | None = None, **changes: Any) -> None:
        """Compare-and-set. `known`: the record's JSON as the caller has just read it, which
        saves reading it again (one round trip instead of two unless it changed meanwhile)."""
        meta = self.keys.meta(run_id)
        while True:
            raw = known if known is not None else await self._redis.hget(meta, "data")
            known = None  # a second try reads it
            if raw is None:
                raise RunNotFound(run_id)
            old = codec.decode_record(raw)
            new = codec.apply_changes(old, changes)
            try:
                done = await self._update_script(
                    keys=[meta, self.keys.lease(run_id)],
                    args=[raw, codec.encode_record(new), self._fence or ""],
                )
            except ResponseError as exc:
                raise self._translate(exc, run_id) from None
            if done:
                break
            # another writer changed the record between our read and our write: redo
        if new.tenant != old.tenant or new.created_at != old.created_at:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.runs(), {run_id: new.created_at})
                if old.tenant is not None and old.tenant != new.tenant:
                    pipe.zrem(self.keys.tenant_runs(old.tenant), run_id)
                if new.tenant is not None:
                    pipe.zadd(self.keys.tenant_runs(new.tenant), {run_id: new.created_at})
                await pipe.execute()

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Newest first. With `status`, the index is scanned in chunks and filtered, so the
        cost grows with the number of newer runs of other statuses."""
        codec.check_page(limit, offset)
        if limit == 0:
            return []
        index = self.keys.runs() if tenant is None else self.keys.tenant_runs(tenant)
        if status is None:
            while True:
                ids = _strs(await self._redis.zrevrange(index, offset, offset + limit - 1))
                records, gone = await self._fetch_live(index, ids)
                if not gone or len(ids) < limit:
                    return [r for r in records if tenant is None or r.tenant == tenant]
                # expired runs were dropped from the index: read the page again, so that it
                # is full and its offset counts live runs only
        out: list[RunRecord] = []
        skip = offset
        pos = 0
        chunk = max(_SCAN_CHUNK, offset + limit)
        while True:
            ids = _strs(await self._redis.zrevrange(index, pos, pos + chunk - 1))
            records, gone = await self._fetch_live(index, ids)
            for rec in records:
                if rec.status != status or (tenant is not None and rec.tenant != tenant):
                    continue
                if skip:
                    skip -= 1
                    continue
                out.append(rec)
                if len(out) == limit:
                    return out
            if len(ids) < chunk:
                return out
            pos += chunk - len(gone)  # the dropped ids no longer take up positions

    async def run_ids_with_prefix(self, prefix: str, *, limit: int = 2) -> list[str]:
        # the run index holds every live run; its glob is escaped, so a prefix is literal
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        found: list[str] = []
        async for member, _score in self._redis.zscan_iter(self.keys.runs(), match=pattern):
            found.append(_str(member))
            if len(found) >= limit * 4:  # a few spare: some may have expired
                break
        gone = set(await self._missing(found)) if found else set()
        return [r for r in found if r not in gone][:limit]

    async def record(
        self, run_id: str, events: Sequence[Event], outputs: Mapping[str, bytes] | None = None
    ) -> None:
        """One atomic script per call. Calls made while another is in flight are sent
        together in one pipeline (group commit: one round trip, and with `appendfsync
        always` one fsync, for all of them); each still succeeds or fails on its own."""
        codec.check_batch(events)
        first_seq = events[0].seq if events else 0
        args: list[str | bytes | int] = [self._fence or "", len(events)]
        for ev in events:
            args.append(ev.seq)
            args.append(codec.encode_event(ev))
        for node, value in codec.check_outputs(outputs).items():
            args.append(node)
            args.append(value)
        item = _PendingRecord(run_id, self.keys.run_keys(run_id), args, self._fence, first_seq)
        await self._submit(item)
        if item.error is not None:
            raise item.error

    async def load_outputs(self, run_id: str) -> dict[str, bytes]:
        raw = await self._redis.hgetall(self.keys.outputs(run_id))
        return {_str(k): _bytes(v) for k, v in raw.items()}

    async def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        if after_seq >= MAX_SEQ:
            return []  # (a stream id after 2**64 - 1 is an error in Redis)
        key = self.keys.events(run_id)
        start = f"{after_seq + 1}-0" if after_seq >= 0 else "-"
        out: list[Event] = []
        while True:
            entries = await self._redis.xrange(key, min=start, max="+", count=_EVENTS_PAGE) or []
            for _entry_id, fields in entries:
                out.append(codec.decode_event(_bytes((fields or {})[b"e"])))
            if len(entries) < _EVENTS_PAGE:
                return out
            last_seq = int(_str(entries[-1][0] or b"0").split("-", 1)[0])
            start = f"{last_seq + 1}-0"

    # -- ResultCache ------------------------------------------------------------------------

    async def cache_get(self, key: str) -> bytes | None:
        raw = await self._redis.get(self.keys.cache(key))
        return _bytes(raw) if raw is not None else None

    async def cache_put(self, key: str, value: bytes, ttl_s: float | None) -> None:
        ttl_ms = max(1, int(ttl_s * 1000)) if ttl_s is not None else None
        await self._redis.set(self.keys.cache(key), value, px=ttl_ms)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    # -- helpers ---------------------------------------------------------------------------

    async def _submit(self, item: _PendingRecord) -> None:
        self._pending.append(item)
        async with self._send_lock:
            while not item.done:
                batch = self._pending[:_MAX_BATCH]
                del self._pending[: len(batch)]
                try:
                    await self._send(batch)
                except Exception as exc:
                    for it in batch:
                        if not it.done:
                            it.done, it.error = True, exc
                except BaseException:
                    # cancelled mid-send: the others in the batch are still waiting, and the
                    # next sender sends them again (the script recognises a stored batch)
                    self._pending[:0] = [it for it in batch if not it.done]
                    raise

    async def _send(self, batch: list[_PendingRecord]) -> None:
        if len(batch) == 1:
            it = batch[0]
            try:
                await self._redis.evalsha(_RECORD_SHA, len(it.keys), *it.keys, *it.args)
            except NoScriptError:
                await self._redis.script_load(_RECORD_LUA)  # a restarted or new server
                return await self._send(batch)
            except ResponseError as exc:
                it.error = self._translate(exc, it.run_id, it.first_seq, it.fence)
            it.done = True
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            for it in batch:
                pipe.evalsha(_RECORD_SHA, len(it.keys), *it.keys, *it.args)
            results = await pipe.execute(raise_on_error=False)
        again: list[_PendingRecord] = []
        for it, res in zip(batch, results, strict=True):
            if isinstance(res, NoScriptError):
                again.append(it)
                continue
            if isinstance(res, ResponseError):
                it.error = self._translate(res, it.run_id, it.first_seq, it.fence)
            elif isinstance(res, Exception):
                it.error = res
            it.done = True
        if again:
            await self._redis.script_load(_RECORD_LUA)
            await self._send(again)
        return None

    async def _fetch_live(
        self, index: str, run_ids: Sequence[str]
    ) -> tuple[list[RunRecord], list[str]]:
        """The records of `run_ids` that exist, and the ids whose meta is gone (expired,
        deleted by hand), which are removed from `index` and from the all-runs index here:
        an index entry is written after its run's meta, so a missing meta means the run is
        gone rather than not yet created."""
        if not run_ids:
            return [], []
        async with self._redis.pipeline(transaction=False) as pipe:
            for rid in run_ids:
                pipe.hget(self.keys.meta(rid), "data")
            raws = await pipe.execute()
        records = [codec.decode_record(raw) for raw in raws if raw is not None]
        gone = [rid for rid, raw in zip(run_ids, raws, strict=True) if raw is None]
        if gone:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(index, *gone)
                if index != self.keys.runs():
                    pipe.zrem(self.keys.runs(), *gone)
                await pipe.execute()
        return records, gone

    async def _missing(self, run_ids: Sequence[str]) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for rid in run_ids:
                pipe.exists(self.keys.meta(rid))
            found = await pipe.execute()
        return [rid for rid, n in zip(run_ids, found, strict=True) if not n]

    def _translate(
        self, exc: ResponseError, run_id: str, first_seq: int = 0, fence: str | None = None
    ) -> Exception:
        msg = str(exc)
        if msg.startswith("TREADLE_NORUN"):
            return RunNotFound(run_id)
        if msg.startswith("TREADLE_LEASE"):
            owner = fence or self._fence
            return LeaseLost(f"run {run_id!r}: the lease is not held by {owner!r}")
        if msg.startswith("TREADLE_SEQ"):
            last = msg.split()[1]
            return codec.JournalError(
                f"run {run_id!r}: event seq {first_seq} must be greater than {last} "
                "(seqs start at 1 and each batch continues the journal)"
            )
        return exc


@dataclass(slots=True)
class _PendingRecord:
    """One `record` call waiting to be sent."""

    run_id: str
    keys: list[str]
    args: list[str | bytes | int]
    fence: str | None
    first_seq: int
    done: bool = False
    error: BaseException | None = field(default=None)


def _str(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _strs(values: Sequence[Any]) -> list[str]:
    return [_str(v) for v in values]


def _check_run_id(run_id: str) -> None:
    # an empty id would give the keys an empty hash tag, which Redis Cluster ignores
    if not run_id:
        raise ValueError("run_id must not be empty")
