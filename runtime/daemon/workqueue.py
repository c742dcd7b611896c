"""The distributed work queue: how workers on several machines share runs through Redis.

- `treadle:queue` is a stream; `enqueue` adds one entry per run to start or resume.
- Workers read it through one consumer group (`XREADGROUP`): each entry goes to one worker
  and stays in that worker's pending list until it is acknowledged (`ack`).
- `treadle:lease:{run}` says which worker runs the run now: set with `SET NX PX`, renewed by
  a heartbeat only while the same owner still holds it, released only by its owner. A worker
  holds a run's lease for as long as it works on it (`LeaseKeeper`), and writes the run's
  journal through `RedisStore.fenced(owner)`, so a worker that lost its lease cannot write.
- The heartbeat also resets the idle time of the worker's queue entry. An entry idle for
  longer than `claim_idle_ms` therefore belongs to a worker that stopped heartbeating (it
  died, hung or lost Redis); `claim` takes such entries over with `XAUTOCLAIM`, and the new
  worker resumes the run from its journal once the old lease has expired.

Delivery is AT LEAST ONCE. An entry is removed only by `ack`, so a run is never lost, but it
can be delivered again: after a worker dies before acking, after a lease expires under a
worker that was merely slow (it then gets `LeaseLost` and must stop), or when the same run
was enqueued twice. A worker must therefore (1) process a run only while holding its lease,
(2) treat a run whose record is already terminal as done and just `ack` it, and (3) rely on
the journal for the rest: finished nodes are not executed again on resume; a node that was
running when its worker died runs again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import LeaseLost, RedisKeys, _str, adopt_client

__all__ = ["Job", "LeaseKeeper", "LeaseLost", "WorkQueue"]

log = logging.getLogger(__name__)

# KEYS: lease.  ARGV: owner, ttl ms.  Take a free lease, or extend one this owner holds.
_ACQUIRE_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease.  ARGV: owner, ttl ms.  Extend only if still the owner.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease.  ARGV: owner.  Delete only if still the owner.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Job:
    """One queue entry handed to a worker, whose lease on `run_id` is held."""

    id: str  # the stream entry id, for ack
    run_id: str
    payload: dict[str, Any] = field(default_factory=dict)
    #: taken over from a worker that stopped heartbeating: the run may be half done
    reclaimed: bool = False
    #: when the claim took the run's lease (`anyio.current_time()`)
    leased_at: float = field(default=0.0, compare=False)


class WorkQueue:
    """Enqueue runs, claim them as a worker, hold their leases, acknowledge them.

    `lease_ms` is the lease's time to live (a heartbeat renews it); `claim_idle_ms` (default
    `lease_ms`) is how long a queue entry must have gone without a heartbeat before another
    worker takes it over.
    """

    def __init__(
        self,
        url_or_client: str | Redis,
        *,
        prefix: str = "treadle",
        group: str = "workers",
        lease_ms: int = 30_000,
        claim_idle_ms: int | None = None,
    ) -> None:
        if lease_ms <= 0:
            raise ValueError("lease_ms must be > 0")
        self._redis, self._owns_client = adopt_client(url_or_client, "WorkQueue")
        self.keys = RedisKeys(prefix)
        self.group = group
        self.lease_ms = lease_ms
        self.claim_idle_ms = lease_ms if claim_idle_ms is None else claim_idle_ms
        self._group_ready = False
        self._autoclaim_cursor = "0-0"
        #: entries idle past `claim_idle_ms` are looked for this often, not on every claim
        self._autoclaim_every_s = self.claim_idle_ms / 4000
        self._next_autoclaim = 0.0
        self._acquire = self._redis.register_script(_ACQUIRE_LUA)
        self._renew = self._redis.register_script(_RENEW_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)

    @property
    def client(self) -> Redis:
        return self._redis

    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if they do not exist (idempotent)."""
        if self._group_ready:
            return
        try:
            # id "0": entries enqueued before the group existed are delivered too
            await self._redis.xgroup_create(self.keys.queue(), self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def enqueue(self, run_id: str, payload: Mapping[str, Any] | None = None) -> str:
        """Add a run to the queue; returns the entry id. `payload` must be JSON."""
        if not run_id:
            raise ValueError("run_id must not be empty")
        entry_id = await self._redis.xadd(
            self.keys.queue(), {"run": run_id, "payload": codec.dumps(dict(payload or {}))}
        )
        return _str(entry_id)

    async def claim(self, worker_id: str, block_ms: int = 0) -> Job | None:
        """The next job for `worker_id`, with its run's lease held by `worker_id`, or None.

        First takes over an entry idle past `claim_idle_ms` (its worker stopped
        heartbeating), then reads a new one, waiting up to `block_ms` (0: do not wait).
        An entry whose run's lease is still held by another worker is left pending (it is a
        second entry for a live run, or a heartbeat that came late) and tried again later.
        """
        if not worker_id:
            raise ValueError("worker_id must not be empty")
        await self.ensure_group()
        try:
            return await self._claim(worker_id, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # the group vanished (a Redis that restarted without persistence): make it again
            self._group_ready = False
            await self.ensure_group()
            return await self._claim(worker_id, block_ms)

    async def _claim(self, worker_id: str, block_ms: int) -> Job | None:
        now = anyio.current_time()
        if now >= self._next_autoclaim:
            entries = await self._autoclaim(worker_id)
            if not entries:  # none idle now: a dead worker's entries wait a little longer
                self._next_autoclaim = now + self._autoclaim_every_s
            for entry_id, fields in entries:
                job = await self._to_job(entry_id, fields, worker_id, reclaimed=True)
                if job is not None:
                    return job
        resp: Any = await self._redis.xreadgroup(
            self.group,
            worker_id,
            {self.keys.queue(): ">"},
            count=1,
            block=block_ms if block_ms > 0 else None,
        )
        # RESP2 answers [[stream, entries]], RESP3 {stream: entries}
        streams = resp.values() if isinstance(resp, dict) else [e for _s, e in resp or []]
        for entries in streams:
            for entry_id, fields in entries:
                job = await self._to_job(entry_id, fields, worker_id, reclaimed=False)
                if job is not None:
                    return job
        return None

    async def ack(self, job: Job) -> bool:
        """Mark the job done and drop its entry; False if it was already acknowledged."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.queue(), self.group, job.id)
            pipe.xdel(self.keys.queue(), job.id)
            acked, _deleted = await pipe.execute()
        return bool(acked)

    async def finish(
        self, job: Job, owner: str, *, expire: Sequence[str] = (), expire_ms: int = 0
    ) -> bool:
        """`ack` the job, give its run's lease back, and let the keys `expire` expire in
        `expire_ms`, in one transaction (one round trip where three would do); False if
        the job was already acknowledged."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for key in expire:
                pipe.pexpire(key, expire_ms)
            pipe.xack(self.keys.queue(), self.group, job.id)
            pipe.xdel(self.keys.queue(), job.id)
            await self._release(keys=[self.keys.lease(job.run_id)], args=[owner], client=pipe)
            results = await pipe.execute()
        return bool(results[len(expire)])

    async def touch(self, job: Job, worker_id: str) -> None:
        """Reset the idle time of `job`'s entry (the heartbeat does this), so that no other
        worker takes it over while `worker_id` is alive."""
        await self._redis.xclaim(self.keys.queue(), self.group, worker_id, 0, [job.id], justid=True)

    # -- leases ----------------------------------------------------------------------------

    async def acquire_lease(self, run_id: str, owner: str, ttl_ms: int | None = None) -> bool:
        """Take the run's lease if it is free (or extend it if `owner` holds it already)."""
        got = await self._acquire(
            keys=[self.keys.lease(run_id)], args=[owner, ttl_ms or self.lease_ms]
        )
        return bool(got)

    async def renew_lease(self, run_id: str, owner: str, ttl_ms: int | None = None) -> bool:
        """Extend the lease if `owner` still holds it; False if it does not."""
        got = await self._renew(
            keys=[self.keys.lease(run_id)], args=[owner, ttl_ms or self.lease_ms]
        )
        return bool(got)

    async def release_lease(self, run_id: str, owner: str) -> bool:
        """Give the lease back if `owner` holds it; False if it does not."""
        got = await self._release(keys=[self.keys.lease(run_id)], args=[owner])
        return bool(got)

    async def lease_owner(self, run_id: str) -> str | None:
        raw = await self._redis.get(self.keys.lease(run_id))
        return _str(raw) if raw is not None else None

    def keep_lease(
        self,
        job: Job,
        owner: str,
        *,
        interval_s: float | None = None,
        cancel_on_loss: bool = True,
    ) -> LeaseKeeper:
        """`async with queue.keep_lease(job, worker_id) as lease:` — see `LeaseKeeper`."""
        return LeaseKeeper(
            self, job.run_id, owner, job=job, interval_s=interval_s, cancel_on_loss=cancel_on_loss
        )

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    # -- helpers ---------------------------------------------------------------------------

    async def _autoclaim(self, worker_id: str) -> list[tuple[Any, Any]]:
        resp: Any = await self._redis.xautoclaim(
            self.keys.queue(),
            self.group,
            worker_id,
            self.claim_idle_ms,
            start_id=self._autoclaim_cursor,
            count=1,
        )
        # Redis 7: [next cursor, [(id, fields)...], [ids deleted from the stream]]
        cursor, entries = resp[0], resp[1]
        self._autoclaim_cursor = _str(cursor)
        # entries acked and deleted meanwhile come back without fields
        return [(eid, fields) for eid, fields in entries if fields]

    async def _to_job(
        self, entry_id: Any, fields: Any, worker_id: str, *, reclaimed: bool
    ) -> Job | None:
        eid = _str(entry_id)
        try:
            run_id = _str(fields[b"run"])
            payload = codec.loads(fields.get(b"payload", b"{}"))
        except (KeyError, ValueError, TypeError):
            # not ours to interpret; acking it keeps it from being redelivered forever
            log.error("dropping malformed queue entry %s: %r", eid, fields)
            await self.ack(Job(id=eid, run_id=""))
            return None
        leased_at = anyio.current_time()
        if not await self.acquire_lease(run_id, worker_id):
            log.info("run %s is leased by another worker; leaving entry %s", run_id, eid)
            return None
        return Job(id=eid, run_id=run_id, payload=payload, reclaimed=reclaimed, leased_at=leased_at)


class LeaseKeeper:
    """Holds a run's lease while the body of `async with` runs, renewing it by heartbeat.

    On entry it (re)acquires the lease (raises `LeaseLost` if another worker holds it); a
    background task renews it every `interval_s` (default a third of the lease time) and
    resets the idle time of the job's queue entry. The lease counts as lost when a renewal
    finds another owner, or when no renewal has succeeded for a whole lease time (Redis
    unreachable: another worker may take over). Then `lost` is set and, with
    `cancel_on_loss` (the default), the body is cancelled and `LeaseLost` raised on exit, so
    the worker stops the run; without it the body keeps running and must watch `lost`.
    On a normal exit the lease is released.
    """

    def __init__(
        self,
        queue: WorkQueue,
        run_id: str,
        owner: str,
        *,
        job: Job | None = None,
        interval_s: float | None = None,
        cancel_on_loss: bool = True,
    ) -> None:
        self.queue = queue
        self.run_id = run_id
        self.owner = owner
        self.job = job
        self.ttl_ms = queue.lease_ms
        self.interval_s = interval_s if interval_s is not None else self.ttl_ms / 3000
        if not (0 < self.interval_s < self.ttl_ms / 1000) or not math.isfinite(self.interval_s):
            raise ValueError("interval_s must be > 0 and shorter than the lease time")
        self.cancel_on_loss = cancel_on_loss
        self.lost = anyio.Event()
        self.reason: str | None = None
        #: the lease was given back with the job (`WorkQueue.finish`): nothing to release
        self.released = False
        self._tg: TaskGroup | None = None
        self._body: anyio.CancelScope | None = None

    async def __aenter__(self) -> LeaseKeeper:
        started = anyio.current_time()
        fresh = self.job is not None and started - self.job.leased_at < self.interval_s
        if fresh:
            assert self.job is not None
            started = self.job.leased_at  # the claim took it just now: it is valid from then
        elif not await self.queue.acquire_lease(self.run_id, self.owner, self.ttl_ms):
            holder = await self.queue.lease_owner(self.run_id)
            raise LeaseLost(f"run {self.run_id!r} is leased by {holder!r}, not {self.owner!r}")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._heartbeat, started + self.ttl_ms / 1000)
        # the body runs inside this scope, so a lost lease can cancel just the body
        self._body = anyio.CancelScope()
        self._body.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None and self._body is not None
        cancelled_by_us = bool(self._body.__exit__(exc_type, exc, tb))
        try:
            self._tg.cancel_scope.cancel()  # stop the heartbeat
            await self._tg.__aexit__(None, None, None)
        finally:
            # also when an outer cancellation is on its way out: hand the run over now
            if not self.lost.is_set() and not self.released:
                with anyio.CancelScope(shield=True):
                    await self._release()
        if self.lost.is_set():
            if exc is None or cancelled_by_us:
                raise LeaseLost(f"run {self.run_id!r}: {self.reason}")
            return False  # the body's own error goes on; `lost` tells the rest
        return cancelled_by_us

    async def _release(self) -> None:
        try:
            await self.queue.release_lease(self.run_id, self.owner)
        except (RedisError, OSError) as err:
            # not fatal: the lease expires by itself after its time to live
            log.warning("could not release the lease of run %s: %s", self.run_id, err)

    async def _heartbeat(self, valid_until: float) -> None:
        while True:
            await anyio.sleep(self.interval_s)
            sent = anyio.current_time()
            held = False
            error: BaseException | None = None
            # a renewal that hangs past the lease's expiry is as good as a failed one
            with anyio.move_on_after(max(valid_until - sent, 0.0)):
                try:
                    held = await self.queue.renew_lease(self.run_id, self.owner, self.ttl_ms)
                    if held and self.job is not None:
                        await self.queue.touch(self.job, self.owner)
                except (RedisError, OSError) as err:
                    error = err
                else:
                    if not held:
                        holder = await _owner_or_none(self.queue, self.run_id)
                        self._lose(f"the lease is now held by {holder!r}, not {self.owner!r}")
                        return
                    valid_until = sent + self.ttl_ms / 1000
                    continue
            if anyio.current_time() >= valid_until:
                self._lose(f"no renewal succeeded within the lease time (last error: {error})")
                return
            log.warning("lease renewal for run %s failed, retrying: %s", self.run_id, error)

    def _lose(self, reason: str) -> None:
        log.warning("lost the lease of run %s: %s", self.run_id, reason)
        self.reason = reason
        self.lost.set()
        if self.cancel_on_loss and self._body is not None:
            self._body.cancel()


async def _owner_or_none(queue: WorkQueue, run_id: str) -> str | None:
    try:
        return await queue.lease_owner(run_id)
    except RedisError:
        return None
