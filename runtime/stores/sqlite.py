"""`SqliteStore`: the embedded durable `StateStore`, the CLI's default (`~/.treadle/runs.db`).

One file, four tables: `runs` (the record as JSON plus the columns `list_runs` filters and
orders on), `events` (one row per event, primary key `(run_id, seq)`), `outputs` (one row
per finished node instance, primary key `(run_id, node)`), and `cache` (the node result
cache: `ResultCache`; expired rows are deleted as new ones are written).

Threading: the stdlib `sqlite3` module blocks, so every statement runs on one worker thread
that this store owns; callers queue an operation and await its result. The thread drains
whatever has queued up while it was busy and commits it as ONE transaction (group commit),
each operation inside its own SAVEPOINT so one failing operation (a missing run) does not
undo the others. `record` returns only after the COMMIT that holds its rows.

Durability: WAL journal. With the default `synchronous="NORMAL"` a COMMIT writes the WAL
(the data is in the file, so a crash of the process loses nothing that `record` returned)
and fsyncs only at checkpoints, so a power loss or OS crash may lose the last commits; pass
`synchronous="FULL"` to fsync every commit as well. Several processes may open the same file:
writers take the lock with `BEGIN IMMEDIATE` and wait up to `busy_timeout_s` for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio

from treadle.runtime.core.events import Event
from treadle.runtime.core.store import MAX_SEQ, RunNotFound, RunRecord, RunStatus
from treadle.runtime.stores import codec

T = TypeVar("T")

DEFAULT_PATH = Path("~/.treadle/runs.db")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    tenant     TEXT,
    status     TEXT NOT NULL,
    created_at REAL NOT NULL,
    data       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_tenant ON runs (tenant, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs (
    run_id TEXT NOT NULL,
    node   TEXT NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (run_id, node)
);
CREATE TABLE IF NOT EXISTS cache (
    key        TEXT PRIMARY KEY,
    data       BLOB NOT NULL,
    expires_at REAL
) WITHOUT ROWID;
"""

_UPSERT_RUN = (
    "INSERT INTO runs (run_id, tenant, status, created_at, data) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id) DO UPDATE SET tenant = excluded.tenant, status = excluded.status, "
    "created_at = excluded.created_at, data = excluded.data"
)
_RUN_STATE = (
    "SELECT EXISTS (SELECT 1 FROM runs WHERE run_id = ?), "
    "(SELECT MAX(seq) FROM events WHERE run_id = ?)"
)
_INSERT_EVENT = "INSERT INTO events (run_id, seq, data) VALUES (?, ?, ?)"
_UPSERT_OUTPUT = (
    "INSERT INTO outputs (run_id, node, data) VALUES (?, ?, ?) "
    "ON CONFLICT (run_id, node) DO UPDATE SET data = excluded.data"
)
_CACHE_GET = "SELECT data FROM cache WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
_CACHE_PUT = (
    "INSERT INTO cache (key, data, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at"
)
#: every this many cache writes, expired rows are deleted
_CACHE_SWEEP_EVERY = 256


class _Op:
    """One queued operation: a function of the connection, and where its result goes."""

    __slots__ = ("error", "fn", "notify", "result", "write")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], write: bool, notify: Callable[[], None]
    ) -> None:
        self.fn = fn
        self.write = write
        self.notify = notify
        self.result: Any = None
        self.error: BaseException | None = None


_CLOSE = object()  # queued by close(): the worker closes the connection and exits


class SqliteStore:
    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 10.0,
        max_batch: int = 256,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.path = str(path) if str(path) == ":memory:" else str(Path(path).expanduser())
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._cache_puts = 0

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # -- StateStore ------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> None:
        params = (
            record.run_id,
            record.tenant,
            record.status,
            record.created_at,
            codec.encode_record(record),
        )
        await self._call(lambda conn: conn.execute(_UPSERT_RUN, params), write=True)

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT data FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone(),
            write=False,
        )
        return codec.decode_record(row[0]) if row is not None else None

    async def update_run(self, run_id: str, **changes: Any) -> None:
        def update(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT data FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            new = codec.apply_changes(codec.decode_record(row[0]), changes)
            conn.execute(
                "UPDATE runs SET tenant = ?, status = ?, created_at = ?, data = ? WHERE run_id = ?",
                (new.tenant, new.status, new.created_at, codec.encode_record(new), run_id),
            )

        await self._call(update, write=True)

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        offset: int = 0,
        id_prefix: str | None = None,
    ) -> list[RunRecord]:
        """Newest first; `id_prefix`: only runs whose id starts with it."""
        codec.check_page(limit, offset)
        where: list[str] = []
        args: list[Any] = []
        if id_prefix:
            # a range of the primary key (LIKE would need escaping and skip the index)
            where.append("run_id >= ? AND run_id < ?")
            args += [id_prefix, id_prefix + "\U0010ffff"]
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        # ties on created_at come out in insertion order, as MemoryStore's stable sort does
        sql = (
            "SELECT data FROM runs"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY created_at DESC, rowid ASC LIMIT ? OFFSET ?"
        )
        args += [limit, offset]
        rows = await self._call(lambda conn: conn.execute(sql, args).fetchall(), write=False)
        return [codec.decode_record(r[0]) for r in rows]

    async def run_ids_with_prefix(self, prefix: str, *, limit: int = 2) -> list[str]:
        # a range on the primary key (no LIKE: '%' and '_' in a prefix are plain here)
        sql = "SELECT run_id FROM runs WHERE run_id >= ? AND substr(run_id, 1, ?) = ? LIMIT ?"
        args = (prefix, len(prefix), prefix, limit)
        rows = await self._call(lambda conn: conn.execute(sql, args).fetchall(), write=False)
        return [r[0] for r in rows]

    async def record(
        self, run_id: str, events: Sequence[Event], outputs: Mapping[str, bytes] | None = None
    ) -> None:
        # encode and check on the caller's side, so bad input fails before it is queued
        codec.check_batch(events)
        event_rows = [(run_id, ev.seq, codec.encode_event(ev)) for ev in events]
        output_rows = [(run_id, k, v) for k, v in codec.check_outputs(outputs).items()]
        first_seq = events[0].seq if events else 0

        def write(conn: sqlite3.Connection) -> None:
            exists, last_seq = conn.execute(_RUN_STATE, (run_id, run_id)).fetchone()
            if not exists:
                raise RunNotFound(run_id)
            if event_rows:
                if last_seq is not None and first_seq <= last_seq:
                    raise codec.JournalError(
                        f"run {run_id!r}: event seq {first_seq} must be greater than "
                        f"{last_seq} (seqs start at 1 and each batch continues the journal)"
                    )
                conn.executemany(_INSERT_EVENT, event_rows)
            if output_rows:
                conn.executemany(_UPSERT_OUTPUT, output_rows)

        await self._call(write, write=True)

    async def load_outputs(self, run_id: str) -> dict[str, bytes]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT node, data FROM outputs WHERE run_id = ?", (run_id,)
            ).fetchall(),
            write=False,
        )
        return {node: bytes(data) for node, data in rows}

    async def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        if after_seq >= MAX_SEQ:
            return []  # (a larger number does not fit SQLite's integers)
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq",
                (run_id, after_seq),
            ).fetchall(),
            write=False,
        )
        return [codec.decode_event(r[0]) for r in rows]

    # -- ResultCache ------------------------------------------------------------------------

    async def cache_get(self, key: str) -> bytes | None:
        now = time.time()
        row = await self._call(
            lambda conn: conn.execute(_CACHE_GET, (key, now)).fetchone(), write=False
        )
        return bytes(row[0]) if row is not None else None

    async def cache_put(self, key: str, value: bytes, ttl_s: float | None) -> None:
        now = time.time()
        expires = now + ttl_s if ttl_s is not None else None
        self._cache_puts += 1
        sweep = self._cache_puts % _CACHE_SWEEP_EVERY == 0

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(_CACHE_PUT, (key, bytes(value), expires))
            if sweep:
                conn.execute("DELETE FROM cache WHERE expires_at <= ?", (now,))

        await self._call(put, write=True)

    async def close(self) -> None:
        """Finish queued work, close the connection and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_CLOSE)
        # join off the event loop; the thread exits right after the queued work
        await anyio.to_thread.run_sync(thread.join)

    # -- the worker thread -----------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """Run `fn(connection)` on the worker thread and return its result.

        If the awaiting task is cancelled, a queued write still happens (it cannot be
        taken back once queued); the caller just does not learn of it.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._worker, name=f"treadle-sqlite:{self.path}", daemon=True
            )
            self._thread.start()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio)
            loop = None
        if loop is not None:
            # fast path: the worker thread wakes the loop directly
            fut: asyncio.Future[None] = loop.create_future()

            def notify(loop: asyncio.AbstractEventLoop = loop) -> None:
                # RuntimeError: the loop is closed, so nobody is waiting any more
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, fut)

            op = _Op(fn, write, notify)
            self._queue.put(op)
            await fut
        else:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            op = _Op(fn, write, lambda: done.set_result(None))
            self._queue.put(op)
            await anyio.to_thread.run_sync(done.result)
        if op.error is not None:
            raise op.error
        result: T = op.result
        return result

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[_Op] = []
            stop = item is _CLOSE
            if isinstance(item, _Op):
                batch.append(item)
            # group commit: take everything that queued up while the last batch ran
            while not stop and len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _CLOSE:
                    stop = True
                elif isinstance(item, _Op):
                    batch.append(item)
            if batch:
                self._execute(batch)
                for op in batch:
                    op.notify()
            if stop:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                return

    def _execute(self, batch: list[_Op]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            for op in batch:
                op.error = exc
            return
        if not any(op.write for op in batch):
            for op in batch:  # reads: each statement is its own snapshot, no lock taken
                _run(op, conn)
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            for op in batch:
                op.error = exc
            return
        if len(batch) == 1:
            op = batch[0]
            _run(op, conn)
            if op.error is not None:
                conn.execute("ROLLBACK")
                return
        else:
            for op in batch:
                conn.execute("SAVEPOINT op")
                _run(op, conn)
                if op.error is not None:
                    conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
        try:
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for op in batch:
                if op.error is None:
                    op.error = exc
                    op.result = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # opened and used only on the worker thread
            cached_statements=64,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA journal_size_limit = 67108864")  # trim the WAL to 64 MiB
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path}: schema version {version} is newer than this treadle "
                        f"understands ({SCHEMA_VERSION}); upgrade treadle"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn


def _run(op: _Op, conn: sqlite3.Connection) -> None:
    try:
        op.result = op.fn(conn)
    except Exception as exc:
        op.error = exc


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # the awaiting task may have been cancelled
        fut.set_result(None)
