"""The gateway's state in Redis: tenant service accounting and the program table, so a
restarted gateway (or its replacement) resumes fair shares where they were.

Kept (under `prefix`, default `treadle:gateway`):

- `{prefix}:tenants` — hash tenant -> JSON `{vtime, service_s, programs_done,
  mean_program_s}`: each tenant's virtual time (its weighted service, the fair-share key)
  and what its runs cost on average (charged when the next one is admitted);
- `{prefix}:vtime` — the system's virtual time (where an idle tenant rejoins);
- `{prefix}:programs` — hash program id -> JSON `{tenant, attained_s, calls}`: open
  programs and the service they have had (their least-attained-service level).

Writes are batched: the scheduler marks what changed and `run` saves it every
`interval_s` in one pipeline, so no request waits for Redis; a crash loses at most the
last interval's accounting. Weights are configuration, not state: they come from the
gateway's config on every start.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from redis.asyncio import Redis

from treadle.runtime.gateway.scheduling import GatewayScheduler

_log = logging.getLogger(__name__)


class GatewayState:
    """Loads the scheduler's state at start and saves what changed (module docstring)."""

    def __init__(
        self, redis: Redis, gateway: GatewayScheduler, *, prefix: str = "treadle:gateway"
    ) -> None:
        self.redis = redis
        self.gateway = gateway
        self.tenants_key = f"{prefix}:tenants"
        self.programs_key = f"{prefix}:programs"
        self.vtime_key = f"{prefix}:vtime"
        self.saves = 0
        self.errors = 0

    async def load(self) -> tuple[int, int]:
        """Restore tenants' accounting and open programs' service; returns how many of
        each were found."""
        sched = self.gateway.scheduler
        tenants = await self.redis.hgetall(self.tenants_key)
        vtime = await self.redis.get(self.vtime_key)
        if vtime is not None:
            sched.vtime = float(vtime)
        for raw_name, raw in tenants.items():
            data = json.loads(raw)
            t = sched.tenant(_text(raw_name))
            t.vtime = float(data["vtime"])
            t.service_s = float(data["service_s"])
            t.programs_done = int(data.get("programs_done", 0))
            t.mean_program_s = float(data.get("mean_program_s", 0.0))
            t.version += 1
        programs = await self.redis.hgetall(self.programs_key)
        for raw_id, raw in programs.items():
            data = json.loads(raw)
            self.gateway.restored_attained[_text(raw_id)] = float(data["attained_s"])
        return len(tenants), len(programs)

    async def save(self) -> int:
        """Write what changed since the last save; returns the number of entries."""
        gw = self.gateway
        sched = gw.scheduler
        tenants, gw.dirty_tenants = gw.dirty_tenants, set()
        programs, gw.dirty_programs = gw.dirty_programs, set()
        closed, gw.closed_programs = gw.closed_programs, set()
        if not (tenants or programs or closed):
            return 0
        pipe = self.redis.pipeline(transaction=False)
        tenant_rows: dict[str, str] = {}
        for name in tenants:
            t = sched.tenants.get(name)
            if t is not None:
                tenant_rows[name] = json.dumps(
                    {
                        "vtime": t.vtime,
                        "service_s": t.service_s,
                        "programs_done": t.programs_done,
                        "mean_program_s": t.mean_program_s,
                    }
                )
        if tenant_rows:
            pipe.hset(self.tenants_key, mapping=tenant_rows)  # type: ignore[arg-type]
        pipe.set(self.vtime_key, repr(sched.vtime))
        program_rows: dict[str, str] = {}
        for pid in programs:
            p = sched.programs.get(pid)
            info = gw.programs.get(pid)
            if p is not None and info is not None:
                program_rows[pid] = json.dumps(
                    {"tenant": info.tenant, "attained_s": p.attained_s, "calls": info.calls}
                )
        if program_rows:
            pipe.hset(self.programs_key, mapping=program_rows)  # type: ignore[arg-type]
        if closed:
            pipe.hdel(self.programs_key, *closed)
        try:
            await pipe.execute()
        except BaseException:
            # not saved: keep it for the next save
            gw.dirty_tenants |= tenants
            gw.dirty_programs |= programs
            gw.closed_programs |= closed - set(gw.programs)
            raise
        self.saves += 1
        return len(tenant_rows) + len(program_rows) + len(closed)

    async def run(self, interval_s: float = 0.1) -> None:
        """Save every `interval_s` until cancelled; a failed save is logged and its
        changes are kept for the next one."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await self.save()
            except Exception as exc:  # Redis away: keep scheduling, save when it is back
                self.errors += 1
                _log.warning("gateway state not saved to Redis: %s", exc)


def tenant_rows(raw: dict[Any, Any]) -> dict[str, dict[str, float]]:
    """The tenants hash as read back (for tools and tests)."""
    return {_text(k): json.loads(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
