"""Per-tenant quotas: concurrent runs and LLM tokens per minute.

- **Concurrent runs**: `treadle:tenant:<t>:active` holds the tenant's runs that are not
  settled yet (a run waiting for human input is not counted: its worker releases it when it
  parks, and an answer admits it again). Submitting adds the run in one script that first
  checks the count, so two API processes cannot both admit the last slot; a worker removes
  the run when it settles it (`release_run`). A slot can leak only if a process dies
  between admitting a run and creating its record; `prune` (run when a tenant hits its
  limit) drops members whose run is terminal or waiting, or missing for longer than a
  minute. Workers release in batches
  (`UsageLedger`).
- **Tokens per minute**: workers count the prompt and completion tokens of every LLM call
  (`UsageLedger`, a run listener) and add them every 0.2 s to a counter per tenant and
  minute (`INCRBY`, expiring after two minutes). A submit is refused while the current
  minute's count is at or over the limit. This is admission control: a run already
  admitted is not stopped mid-way when its tenant goes over.

Refusals raise `QuotaExceeded` with the seconds after which a retry can succeed (the API's
`Retry-After`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from treadle.errors import DaemonError
from treadle.runtime.core.context import RunContext
from treadle.runtime.core.events import Event, LLMCallFinished
from treadle.runtime.core.store import TERMINAL
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.tenants import Tenant
from treadle.runtime.stores import codec

log = logging.getLogger(__name__)

#: a member of the active set whose run record never appeared is dropped after this long
_ORPHAN_AFTER_S = 60.0
#: statuses that hold no slot: settled, or parked until a person answers
_NOT_ACTIVE = TERMINAL | {"waiting"}

# KEYS: active set.  ARGV: limit, run id, now.  1: admitted (or already in), 0: full.
_ADMIT_LUA = """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""


class QuotaExceeded(DaemonError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, retry_after_s)


def current_minute(now: float | None = None) -> int:
    return int((now if now is not None else time.time()) // 60)


class Quotas:
    def __init__(self, redis: Redis, keys: DaemonKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._admit = redis.register_script(_ADMIT_LUA)

    async def check_tokens(self, tenant: Tenant) -> None:
        if tenant.tokens_per_minute is None:
            return
        now = time.time()
        used = await self.tokens_this_minute(tenant.id, now)
        if used >= tenant.tokens_per_minute:
            raise QuotaExceeded(
                f"tenant {tenant.id!r} used {used} of its {tenant.tokens_per_minute} LLM tokens "
                "this minute",
                math.ceil(60 - now % 60),
            )

    async def admit_run(self, tenant: Tenant, run_id: str) -> None:
        """Count `run_id` against the tenant's concurrent runs, or raise `QuotaExceeded`."""
        key = self.keys.active(tenant.id)
        args: list[str | int | float] = [tenant.max_concurrent_runs, run_id, time.time()]
        if await self._admit(keys=[key], args=args):
            return
        if await self.prune(tenant.id) and await self._admit(keys=[key], args=args):
            return
        raise QuotaExceeded(
            f"tenant {tenant.id!r} has {tenant.max_concurrent_runs} runs in progress, its "
            "limit; retry when one has finished",
            1,
        )

    async def release_run(self, tenant_id: str, run_id: str) -> None:
        await self.redis.zrem(self.keys.active(tenant_id), run_id)

    async def active_runs(self, tenant_id: str) -> int:
        return int(await self.redis.zcard(self.keys.active(tenant_id)))

    async def tokens_this_minute(self, tenant_id: str, now: float | None = None) -> int:
        return int(await self.redis.get(self.keys.tokens(tenant_id, current_minute(now))) or 0)

    async def prune(self, tenant_id: str) -> int:
        """Drop members of the active set whose run is settled or never appeared."""
        key = self.keys.active(tenant_id)
        members: Any = await self.redis.zrange(key, 0, -1, withscores=True)
        if not members:
            return 0
        runs = self.keys.runs
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id, _score in members:
                pipe.hget(runs.meta(run_id.decode()), "data")
            raws = await pipe.execute()
        now = time.time()
        stale = []
        for (run_id, score), raw in zip(members, raws, strict=True):
            if raw is None:
                if now - float(score) > _ORPHAN_AFTER_S:
                    stale.append(run_id)
            elif codec.decode_record(raw).status in _NOT_ACTIVE:
                stale.append(run_id)
        if stale:
            await self.redis.zrem(key, *stale)
        return len(stale)


class UsageLedger:
    """A worker's quota bookkeeping, written to Redis in batches.

    - `listener` (a run listener; it only adds to a dict) counts LLM tokens per tenant
      and minute;
    - `release_run` queues a settled run's removal from its tenant's active set.

    `run()` writes both every `interval_s` in one pipeline (instead of a round trip per
    run), and once more when cancelled. A release lost in a crash is harmless: the run is
    terminal, and `Quotas.prune` drops terminal runs from the active set.
    """

    def __init__(self, redis: Redis, keys: DaemonKeys, *, interval_s: float = 0.2) -> None:
        self.redis = redis
        self.keys = keys
        self.interval_s = interval_s
        self._tokens: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._released: list[tuple[str, str]] = []

    def listener(self, ctx: RunContext, event: Event) -> None:
        if type(event) is LLMCallFinished and ctx.options.tenant:
            tokens = event.prompt_tokens + event.completion_tokens
            if tokens:
                self._tokens[(ctx.options.tenant, current_minute(event.ts))] += tokens

    def release_run(self, tenant_id: str, run_id: str) -> None:
        self._released.append((tenant_id, run_id))

    async def flush(self) -> None:
        if not self._tokens and not self._released:
            return
        tokens, self._tokens = self._tokens, defaultdict(int)
        released, self._released = self._released, []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (tenant, minute), count in tokens.items():
                    key = self.keys.tokens(tenant, minute)
                    pipe.incrby(key, count)
                    pipe.expire(key, 120)
                for tenant, run_id in released:
                    pipe.zrem(self.keys.active(tenant), run_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # keep them for the next flush: a quota must not forget usage
            for k, v in tokens.items():
                self._tokens[k] += v
            self._released[:0] = released
            log.warning("could not record quota usage (will retry): %s", exc)

    async def run(self) -> None:
        try:
            while True:
                await anyio.sleep(self.interval_s)
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()
