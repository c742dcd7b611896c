"""`RedisStore` specifics: the key layout, durability across a server crash, fencing."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from treadle.runtime.core.events import NodeFinished, RunStarted
from treadle.runtime.core.store import RunNotFound, RunRecord
from treadle.runtime.daemon.workqueue import WorkQueue
from treadle.runtime.stores.codec import JournalError
from treadle.runtime.stores.redis import LeaseLost, RedisKeys, RedisStore

pytestmark = pytest.mark.anyio


def finished(run_id: str, seq: int) -> NodeFinished:
    return NodeFinished(seq=seq, run_id=run_id, ts=float(seq), node=f"n{seq}", duration_s=0.25)


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def cluster_slot(key: bytes) -> int:
    """Redis Cluster's HASH_SLOT: CRC16 of the hash tag if the key has a non-empty one."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16_xmodem(key) % 16384


def test_slot_function_matches_redis_cluster() -> None:
    # reference values from the Redis Cluster specification / CLUSTER KEYSLOT
    assert cluster_slot(b"foo") == 12182
    assert cluster_slot(b"{user1000}.following") == cluster_slot(b"{user1000}.followers")
    assert cluster_slot(b"foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384
    assert cluster_slot(b"foo{{bar}}zap") == crc16_xmodem(b"{bar") % 16384
    for key in (b"treadle:{r1}:meta", b"x}y", b"z{w", b"plain"):
        assert cluster_slot(key) == key_slot(key)  # redis-py's own implementation


@pytest.mark.parametrize("run_id", ["run-1", "a:b", "x}y", "z{w", "ü✓"])
async def test_every_key_of_a_run_shares_one_hash_slot(redis_url: str, run_id: str) -> None:
    store = RedisStore(redis_url)
    queue = WorkQueue(store.client, lease_ms=500)
    try:
        await store.create_run(RunRecord(run_id=run_id, graph="g", tenant="acme"))
        await store.record(run_id, [finished(run_id, 1)], {"n1": b"1"})
        assert await queue.acquire_lease(run_id, "w1")
        keys = {k for k in await store.client.keys("*") if run_id.encode() in k}
        expected = {k.encode() for k in store.keys.run_keys(run_id)}
        assert keys == expected  # meta, out, events, lease: nothing else is per run
        assert len({cluster_slot(k) for k in keys}) == 1
        assert all(f"{{{run_id}}}".encode() in k for k in keys)
        # and the index keys exist apart from the run's keys
        assert await store.client.zscore("treadle:runs", run_id) is not None
        assert await store.client.zscore("treadle:tenant:acme:runs", run_id) is not None
    finally:
        await store.close()


async def test_layout_names() -> None:
    keys = RedisKeys("tr")
    assert keys.meta("r") == "tr:{r}:meta"
    assert keys.outputs("r") == "tr:{r}:out"
    assert keys.events("r") == "tr:{r}:events"
    assert keys.lease("r") == "tr:lease:{r}"
    assert keys.queue() == "tr:queue"


async def test_events_are_a_stream_with_seq_ids(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="p")
    try:
        await store.create_run(RunRecord(run_id="r", graph="g"))
        first = RunStarted(seq=1, run_id="r", ts=1.0, graph="g")
        await store.record("r", [first, finished("r", 2)])
        entries = await store.client.xrange("p:{r}:events")
        assert [eid for eid, _ in entries] == [b"1-0", b"2-0"]
        assert await store.client.hget("p:{r}:meta", "last_seq") == b"2"
    finally:
        await store.close()


async def test_data_survives_a_server_crash_with_aof(aof_redis: Any) -> None:
    store = RedisStore(aof_redis.url)
    try:
        await store.create_run(RunRecord(run_id="r", graph="g", tenant="t", inputs={"q": "?"}))
        for seq in range(1, 51):
            await store.record("r", [finished("r", seq)], {f"n{seq}": str(seq).encode()})
        await store.update_run("r", status="running")
        aof_redis.kill()  # SIGKILL right after the last acknowledged write
        aof_redis.start()  # same directory, same port

        # the same client reconnects by itself
        rec = await store.get_run("r")
        assert rec is not None and rec.status == "running" and rec.inputs == {"q": "?"}
        assert len(await store.load_outputs("r")) == 50
        assert [e.seq for e in await store.read_events("r")] == list(range(1, 51))
        assert [r.run_id for r in await store.list_runs(tenant="t")] == ["r"]
        # the record script is loaded again after the restart emptied the script cache
        await store.record("r", [finished("r", 51)], {"n51": b"51"})
        assert len(await store.read_events("r", after_seq=50)) == 1
    finally:
        await store.close()


async def test_a_retried_batch_is_stored_once(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await store.create_run(RunRecord(run_id="r", graph="g"))
        batch = [finished("r", 1), finished("r", 2)]
        await store.record("r", batch, {"a": b"1"})
        await store.record("r", batch, {"a": b"1"})  # as after a reply lost on the way back
        assert [e.seq for e in await store.read_events("r")] == [1, 2]
        other = [finished("r", 1), NodeFinished(seq=2, run_id="r", ts=9.0, node="x", duration_s=0)]
        with pytest.raises(JournalError):
            await store.record("r", other)
    finally:
        await store.close()


async def test_a_fenced_store_writes_only_while_holding_the_lease(redis_url: str) -> None:
    store = RedisStore(redis_url)
    queue = WorkQueue(store.client, lease_ms=5_000)
    w1, w2 = store.fenced("w1"), store.fenced("w2")
    try:
        await store.create_run(RunRecord(run_id="r", graph="g"))
        with pytest.raises(LeaseLost):  # nobody holds it
            await w1.record("r", [finished("r", 1)])
        assert await queue.acquire_lease("r", "w1")
        await w1.record("r", [finished("r", 1)], {"n1": b"1"})
        await w1.update_run("r", status="running")
        with pytest.raises(LeaseLost):
            await w2.record("r", [finished("r", 2)], {"n2": b"2"})
        with pytest.raises(LeaseLost):
            await w2.update_run("r", status="failed")
        # the lease passes to w2: w1 can no longer write
        assert await queue.release_lease("r", "w1")
        assert await queue.acquire_lease("r", "w2")
        with pytest.raises(LeaseLost):
            await w1.record("r", [finished("r", 2)], {"n2": b"stale"})
        await w2.record("r", [finished("r", 2)], {"n2": b"2"})
        assert await store.load_outputs("r") == {"n1": b"1", "n2": b"2"}
        rec = await store.get_run("r")
        assert rec is not None and rec.status == "running"
        await w1.close()  # a view does not close the shared client
        assert await store.get_run("r") is not None
    finally:
        await store.close()


async def test_a_client_that_decodes_responses_is_refused(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()


async def test_an_empty_run_id_is_refused(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        with pytest.raises(ValueError):
            await store.create_run(RunRecord(run_id="", graph="g"))
    finally:
        await store.close()


async def test_list_by_status_scans_past_one_chunk(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        for i in range(450):
            status = "failed" if i % 150 == 0 else "succeeded"
            await store.create_run(
                RunRecord(run_id=f"r{i:03}", graph="g", status=status, created_at=float(i))
            )
        failed = await store.list_runs(status="failed")
        assert [r.run_id for r in failed] == ["r300", "r150", "r000"]
        assert [r.run_id for r in await store.list_runs(status="failed", offset=2)] == ["r000"]
    finally:
        await store.close()


async def test_concurrent_records_are_sent_together_and_fail_alone(redis_url: str) -> None:
    store = RedisStore(redis_url)
    w1 = store.fenced("w1")
    queue = WorkQueue(store.client)
    try:
        for i in range(30):
            await store.create_run(RunRecord(run_id=f"r{i}", graph="g"))
        assert await queue.acquire_lease("r0", "w2")
        await store.client.script_flush()  # the batch must load the script itself
        errors: dict[str, BaseException] = {}

        async def call(run_id: str, target: RedisStore) -> None:
            try:
                await target.record(run_id, [finished(run_id, 1)], {"a": run_id.encode()})
            except Exception as exc:
                errors[run_id] = exc

        async with anyio.create_task_group() as tg:
            for i in range(1, 30):
                tg.start_soon(call, f"r{i}", store)
            tg.start_soon(call, "missing", store)
            tg.start_soon(call, "r0", w1)  # the lease is w2's
        assert isinstance(errors.pop("missing"), RunNotFound)
        assert isinstance(errors.pop("r0"), LeaseLost)
        assert errors == {}
        for i in range(1, 30):
            assert await store.load_outputs(f"r{i}") == {"a": f"r{i}".encode()}
        assert await store.load_outputs("r0") == {}
    finally:
        await store.close()
