"""The Redis work queue: claiming, taking over from a dead worker, leases and heartbeats.

Lease times are a few hundred milliseconds to keep the tests fast; every wait for an expiry
is a poll with an upper bound, never an assertion on elapsed time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from treadle.runtime.core.events import NodeFinished
from treadle.runtime.core.store import RunRecord
from treadle.runtime.daemon.workqueue import Job, LeaseKeeper, LeaseLost, WorkQueue
from treadle.runtime.stores.redis import RedisStore

pytestmark = pytest.mark.anyio

LEASE_MS = 300


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[WorkQueue]:
    q = WorkQueue(redis_url, lease_ms=LEASE_MS)
    try:
        yield q
    finally:
        await q.close()


async def claim_within(queue: WorkQueue, worker: str, seconds: float) -> Job:
    with anyio.fail_after(seconds):
        while True:
            job = await queue.claim(worker, block_ms=50)
            if job is not None:
                return job


async def test_enqueue_claim_ack(queue: WorkQueue) -> None:
    assert await queue.claim("w1") is None  # empty: no wait with block_ms=0
    entry = await queue.enqueue("r1", {"source": "flows/a.yaml", "resume": True})
    job = await queue.claim("w1", block_ms=100)
    assert job == Job(
        id=entry, run_id="r1", payload={"source": "flows/a.yaml", "resume": True}, reclaimed=False
    )
    assert await queue.lease_owner("r1") == "w1"
    assert await queue.claim("w2") is None  # delivered once
    assert await queue.ack(job)
    assert not await queue.ack(job)
    assert await queue.client.xlen(queue.keys.queue()) == 0  # acked entries are dropped


async def test_each_job_goes_to_one_worker(queue: WorkQueue) -> None:
    for i in range(6):
        await queue.enqueue(f"r{i}")
    got: dict[str, list[str]] = {"w1": [], "w2": []}

    async def worker(name: str) -> None:
        while (job := await queue.claim(name, block_ms=20)) is not None:
            got[name].append(job.run_id)
            await queue.ack(job)
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "w1")
        tg.start_soon(worker, "w2")
    assert sorted(got["w1"] + got["w2"]) == [f"r{i}" for i in range(6)]


async def test_a_blocking_claim_wakes_on_enqueue(queue: WorkQueue) -> None:
    await queue.ensure_group()
    result: list[Job | None] = []

    async def wait() -> None:
        result.append(await queue.claim("w1", block_ms=5_000))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.05)
            await queue.enqueue("late")
    assert result[0] is not None and result[0].run_id == "late"


async def test_a_dead_workers_job_is_taken_over_after_its_lease(redis_url: str) -> None:
    store = RedisStore(redis_url)
    queue = WorkQueue(store.client, lease_ms=LEASE_MS)
    try:
        await store.create_run(RunRecord(run_id="r", graph="g"))
        await queue.enqueue("r")
        job_a = await queue.claim("A")
        assert job_a is not None
        a_store = store.fenced("A")
        await a_store.record("r", [NodeFinished(seq=1, run_id="r", ts=1.0, node="x", duration_s=0)])
        # A now stops heartbeating (it "dies"): once its lease and its entry's idle time
        # have run out, B takes the same entry over and holds the lease.
        job_b = await claim_within(queue, "B", seconds=5)
        assert job_b.id == job_a.id and job_b.run_id == "r" and job_b.reclaimed
        assert await queue.lease_owner("r") == "B"
        # A, if it was only stalled, can neither renew nor write any more
        assert not await queue.renew_lease("r", "A")
        with pytest.raises(LeaseLost):
            await a_store.record(
                "r", [NodeFinished(seq=2, run_id="r", ts=2.0, node="y", duration_s=0)]
            )
        # B resumes from the journal and finishes
        assert [e.seq for e in await store.read_events("r")] == [1]
        assert await queue.ack(job_b)
        assert await queue.release_lease("r", "B")
    finally:
        await store.close()


async def test_a_heartbeating_worker_keeps_its_job(redis_url: str) -> None:
    # a longer lease than elsewhere: a heartbeat delayed by a loaded machine is no failure
    queue = WorkQueue(redis_url, lease_ms=800)
    try:
        await queue.enqueue("r")
        job = await queue.claim("A")
        assert job is not None
        async with queue.keep_lease(job, "A", interval_s=0.1) as lease:
            # more than a lease time passes; B must never get the job, and the entry stays
            # A's (the heartbeat resets its idle time, so XAUTOCLAIM does not move it to B)
            for _ in range(12):
                assert await queue.claim("B", block_ms=100) is None
            assert not lease.lost.is_set()
            assert await queue.lease_owner("r") == "A"
            pending = await queue.client.xpending_range(
                queue.keys.queue(), queue.group, min="-", max="+", count=10
            )
            assert [(p["message_id"], p["consumer"]) for p in pending] == [(job.id.encode(), b"A")]
            assert await queue.ack(job)
        assert await queue.lease_owner("r") is None  # released on exit
        assert await queue.claim("B") is None
    finally:
        await queue.close()


async def test_a_second_entry_for_a_leased_run_waits(queue: WorkQueue) -> None:
    await queue.enqueue("r")
    first = await queue.claim("A")
    assert first is not None
    await queue.enqueue("r")  # e.g. a resume request while A still runs it
    async with queue.keep_lease(first, "A"):
        assert await queue.claim("B") is None  # A holds the lease: not handed out
        assert await queue.ack(first)
    # A is done and the lease is free: the second entry is handed out once it is due
    second = await claim_within(queue, "B", seconds=5)
    assert second.run_id == "r" and second.id != first.id


async def test_leases_are_renewed_and_released_only_by_their_owner(queue: WorkQueue) -> None:
    assert await queue.acquire_lease("r", "A")
    assert await queue.acquire_lease("r", "A")  # re-entrant for the same owner
    assert not await queue.acquire_lease("r", "B")
    assert not await queue.renew_lease("r", "B")
    assert not await queue.release_lease("r", "B")
    assert await queue.lease_owner("r") == "A"
    assert await queue.renew_lease("r", "A", ttl_ms=10_000)
    assert await queue.client.pttl(queue.keys.lease("r")) > LEASE_MS
    assert await queue.release_lease("r", "A")
    assert not await queue.release_lease("r", "A")
    assert not await queue.renew_lease("r", "A")
    assert await queue.acquire_lease("r", "B")


async def test_a_lease_expires_without_renewal(queue: WorkQueue) -> None:
    assert await queue.acquire_lease("r", "A")
    with anyio.fail_after(5):
        while await queue.lease_owner("r") is not None:
            await anyio.sleep(0.05)
    assert not await queue.renew_lease("r", "A")
    assert await queue.acquire_lease("r", "B")


async def test_losing_the_lease_stops_the_body(queue: WorkQueue) -> None:
    keeper = LeaseKeeper(queue, "r", "A", interval_s=0.05)
    reached_end = False
    with anyio.fail_after(5), pytest.raises(LeaseLost, match="'B'"):
        async with keeper:
            # another worker takes the run over (as after a long stall of A)
            await queue.client.set(queue.keys.lease("r"), "B", px=5_000)
            await anyio.sleep(10)
            reached_end = True
    assert not reached_end
    assert keeper.lost.is_set()
    assert await queue.lease_owner("r") == "B"  # not released: it is B's now


async def test_without_cancel_the_body_sees_the_loss(queue: WorkQueue) -> None:
    keeper = LeaseKeeper(queue, "r", "A", interval_s=0.05, cancel_on_loss=False)
    with anyio.fail_after(5), pytest.raises(LeaseLost):
        async with keeper:
            await queue.client.delete(queue.keys.lease("r"))
            await keeper.lost.wait()
            assert keeper.reason is not None and "None" in keeper.reason


async def test_a_body_error_propagates_and_the_lease_is_released(queue: WorkQueue) -> None:
    with pytest.raises(ZeroDivisionError):
        async with LeaseKeeper(queue, "r", "A", interval_s=0.05):
            assert await queue.lease_owner("r") == "A"
            await anyio.sleep(0.12)  # a few heartbeats
            _ = 1 / 0
    assert await queue.lease_owner("r") is None


async def test_an_outer_cancel_releases_the_lease(queue: WorkQueue) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with LeaseKeeper(queue, "r", "A", interval_s=0.05):
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert await queue.lease_owner("r") is None


async def test_entering_a_lease_held_by_another_fails(queue: WorkQueue) -> None:
    assert await queue.acquire_lease("r", "B")
    with pytest.raises(LeaseLost, match="'B'"):
        async with LeaseKeeper(queue, "r", "A"):
            pytest.fail("the body must not run")
    assert await queue.lease_owner("r") == "B"


async def test_bad_arguments(queue: WorkQueue) -> None:
    with pytest.raises(ValueError):
        await queue.enqueue("")
    with pytest.raises(ValueError):
        await queue.claim("")
    with pytest.raises(ValueError):
        LeaseKeeper(queue, "r", "A", interval_s=1.0)  # not shorter than the 0.3 s lease
    with pytest.raises(ValueError):
        WorkQueue(queue.client, lease_ms=0)


async def test_the_group_is_made_again_if_redis_lost_it(queue: WorkQueue) -> None:
    await queue.enqueue("r1")
    await queue.client.delete(queue.keys.queue())  # as after a restart without persistence
    await queue.enqueue("r2")
    job = await queue.claim("w1")
    assert job is not None and job.run_id == "r2"


async def test_a_malformed_entry_is_dropped(queue: WorkQueue) -> None:
    await queue.ensure_group()
    await queue.client.xadd(queue.keys.queue(), {"something": "else"})
    await queue.enqueue("r")
    job = await queue.claim("w1")
    assert job is None  # the malformed one was taken and dropped
    job = await queue.claim("w1")
    assert job is not None and job.run_id == "r"
    assert await queue.client.xlen(queue.keys.queue()) == 1


async def test_finish_acks_releases_and_expires_in_one_transaction(queue: WorkQueue) -> None:
    await queue.enqueue("r9")
    job = await queue.claim("w1", block_ms=100)
    assert job is not None
    await queue.client.set("keep:r9", b"x")
    assert await queue.finish(job, "w1", expire=["keep:r9"], expire_ms=60_000)
    assert await queue.lease_owner("r9") is None
    assert 0 < await queue.client.pttl("keep:r9") <= 60_000
    assert await queue.client.xlen(queue.keys.queue()) == 0
    assert not await queue.finish(job, "w1")  # acknowledged already
