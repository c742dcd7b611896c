"""Retention in `RedisStore`: `expire_run` lets a run's keys expire together, and the
listing indexes drop ids whose run has expired (lazily while listing, and `prune_index`)."""

from __future__ import annotations

import time

import anyio
import pytest

from treadle.runtime.core.events import NodeFinished, RunStarted
from treadle.runtime.core.store import RunRecord
from treadle.runtime.stores.redis import RedisStore

pytestmark = pytest.mark.anyio


async def _finished_run(store: RedisStore, run_id: str, tenant: str, created_at: float) -> None:
    await store.create_run(
        RunRecord(run_id=run_id, graph="g", tenant=tenant, created_at=created_at)
    )
    started = RunStarted(seq=1, run_id=run_id, ts=1.0, graph="g")
    done = NodeFinished(seq=2, run_id=run_id, ts=2.0, node="a", duration_s=0.1)
    await store.record(run_id, [started, done], {"a": b'"x"'})
    await store.update_run(run_id, status="succeeded")


async def _wait_gone(store: RedisStore, run_id: str) -> None:
    with anyio.fail_after(10):
        while await store.client.exists(*store.keys.run_keys(run_id)[:3]):
            await anyio.sleep(0.05)


async def test_expire_run_sets_one_ttl_on_meta_outputs_and_events(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await _finished_run(store, "r1", "acme", time.time())
        await store.expire_run("r1", 60)
        meta, out, events = store.keys.run_keys("r1")[:3]
        for key in (meta, out, events):
            ttl = await store.client.pttl(key)
            assert 0 < ttl <= 60_000, key
        with pytest.raises(ValueError):
            await store.expire_run("r1", 0)
    finally:
        await store.close()


async def test_listing_drops_expired_runs_without_errors(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        now = time.time()
        await _finished_run(store, "old", "acme", now - 2)
        await _finished_run(store, "kept", "acme", now - 1)
        await _finished_run(store, "newer", "acme", now)
        await store.expire_run("old", 0.3)
        await store.expire_run("newer", 0.3)
        await _wait_gone(store, "old")
        await _wait_gone(store, "newer")
        assert await store.get_run("old") is None
        assert await store.load_outputs("old") == {}
        assert await store.read_events("old") == []

        # a page of one is refilled past the expired (newest) entry
        page = await store.list_runs(tenant="acme", limit=1)
        assert [r.run_id for r in page] == ["kept"]
        # a listing that meets the other expired entry drops it from the indexes too
        assert [r.run_id for r in await store.list_runs(tenant="acme")] == ["kept"]
        tenant_index = store.keys.tenant_runs("acme")
        assert await store.client.zrange(tenant_index, 0, -1) == [b"kept"]
        assert await store.client.zrange(store.keys.runs(), 0, -1) == [b"kept"]
        assert [r.run_id for r in await store.list_runs(status="succeeded")] == ["kept"]
    finally:
        await store.close()


async def test_prune_index_removes_only_expired_ids(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        now = time.time()
        for i in range(5):
            await _finished_run(store, f"r{i}", "acme" if i % 2 else "beta", now - 100 + i)
        await _finished_run(store, "recent", "acme", now)
        # r0..r2 and `recent` go; `recent` is newer than the cutoff, so prune leaves it
        for rid in ("r0", "r1", "r2", "recent"):
            await store.expire_run(rid, 0.2)
        for rid in ("r0", "r1", "r2", "recent"):
            await _wait_gone(store, rid)
        removed = await store.prune_index(now - 10, batch=2)
        assert removed == 6  # r0, r1, r2 from the all-runs index and from their tenants'
        assert await store.client.zrange(store.keys.runs(), 0, -1) == [b"r3", b"r4", b"recent"]
        assert await store.client.zrange(store.keys.tenant_runs("acme"), 0, -1) == [
            b"r3",
            b"recent",
        ]
        assert await store.client.zrange(store.keys.tenant_runs("beta"), 0, -1) == [b"r4"]
        assert await store.prune_index(now - 10) == 0
    finally:
        await store.close()
