"""The worker loop in-process: lease takeover, fencing after a lost lease, cancelling,
handing runs over on shutdown, duplicate queue entries and runs with no program."""

from __future__ import annotations

import pytest
from daemon_support import (
    Daemon,
    finished_counts,
    journal,
    running_workers,
    slow_workflow,
    submit,
    wait_for,
)

from treadle.runtime.core.events import RunFinished, RunStarted
from treadle.runtime.core.store import RunRecord
from treadle.runtime.daemon.registry import source_of

pytestmark = pytest.mark.anyio

SLOW = slow_workflow(latency_s=0.05, steps=6)  # 8 nodes, ~0.35 s
SLOWER = slow_workflow(latency_s=0.2, steps=8)  # 10 nodes, ~1.8 s
SLOWER_NODES = 10


async def status_of(daemon: Daemon, run_id: str) -> str:
    """The status the API reports (a fresh run's record says `pending` until it ends)."""
    record = await daemon.services.store.get_run(run_id)
    assert record is not None and record.tenant is not None
    tenant = await daemon.services.tenants.get(record.tenant)
    assert tenant is not None
    return (await daemon.services.runs.get(tenant, run_id)).status


async def test_takes_over_a_run_whose_lease_expired(api_only: Daemon) -> None:
    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOW)
    run_id = await submit(api_only, key, "slow", "t")
    # a worker that claims the run and then hangs: its lease expires, its entry goes idle
    ghost = await services.queue.claim("ghost-worker")
    assert ghost is not None and ghost.run_id == run_id
    assert await services.queue.lease_owner(run_id) == "ghost-worker"
    async with running_workers(services) as (worker,):
        await wait_for(lambda: _is(status_of(api_only, run_id), "succeeded"))
    assert worker.stats.reclaimed == 1 and worker.stats.settled == 1
    assert await services.queue.lease_owner(run_id) is None
    assert await services.redis.xlen(services.queue.keys.queue()) == 0


async def test_a_stolen_lease_stops_the_run_and_nothing_more_is_written(api_only: Daemon) -> None:
    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOWER)
    run_id = await submit(api_only, key, "slow", "t")
    lease_key = services.queue.keys.lease(run_id)
    async with running_workers(services) as (worker,):
        await wait_for(lambda: _finished_at_least(api_only, run_id, 2))
        # another owner takes the lease (as after an expiry under a slow worker)
        await services.redis.set(lease_key, b"intruder", px=60_000)
        await wait_for(lambda: _true(worker.stats.lease_lost == 1))
        frozen = await journal(services.store, run_id)
        await _sleep(0.6)
        assert await journal(services.store, run_id) == frozen  # fenced: no writes
        assert await status_of(api_only, run_id) == "running"
        # the intruder goes away; the entry, unacknowledged, is taken over and resumed
        await services.redis.delete(lease_key)
        await wait_for(lambda: _is(status_of(api_only, run_id), "succeeded"))
    events = await journal(services.store, run_id)
    counts = finished_counts(events)
    assert len(counts) == SLOWER_NODES and max(counts.values()) == 1
    starts = [e for e in events if isinstance(e, RunStarted)]
    assert [s.resumed for s in starts] == [False, True]


async def test_cancel_stops_a_running_run(daemon: Daemon) -> None:
    key = await daemon.tenant("acme")
    await daemon.register(key, SLOWER)
    run_id = await submit(daemon, key, "slow", "t")
    await wait_for(lambda: _finished_at_least(daemon, run_id, 1))
    async with daemon.client(key) as c:
        resp = await c.post(f"/v1/runs/{run_id}/cancel")
        assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    final = await daemon.wait_run(key, run_id, timeout_s=5)
    assert final["status"] == "cancelled"
    events = await journal(daemon.services.store, run_id)
    assert isinstance(events[-1], RunFinished) and events[-1].status == "cancelled"
    assert len(finished_counts(events)) < SLOWER_NODES
    async with daemon.client(key) as c:
        again = await c.post(f"/v1/runs/{run_id}/cancel")
        assert again.status_code == 409

        async def slot_free() -> bool:
            return bool((await c.get("/v1/tenant")).json()["active_runs"] == 0)

        await wait_for(slot_free, timeout_s=5)  # the worker releases slots in batches


async def test_cancel_before_a_worker_takes_the_run(api_only: Daemon) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOW)
    run_id = await submit(api_only, key, "slow", "t")
    async with api_only.client(key) as c:
        assert (await c.post(f"/v1/runs/{run_id}/cancel")).status_code == 202
    async with running_workers(api_only.services):
        final = await api_only.wait_run(key, run_id)
    assert final["status"] == "cancelled" and final["error"] == "cancelled before it started"
    assert await journal(api_only.services.store, run_id) == []


async def test_shutdown_hands_runs_over_to_another_worker(api_only: Daemon) -> None:
    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOWER)
    run_id = await submit(api_only, key, "slow", "t")
    async with running_workers(services) as (first,):
        first.options.drain_s = 0.1  # not enough to finish: the run is interrupted
        await wait_for(lambda: _finished_at_least(api_only, run_id, 2))
    assert first.stats.interrupted == 1 and first.stats.settled == 0
    assert await status_of(api_only, run_id) == "running"
    async with running_workers(services) as (second,):
        await wait_for(lambda: _is(status_of(api_only, run_id), "succeeded"))
    assert second.stats.resumed == 1
    counts = finished_counts(await journal(services.store, run_id))
    assert len(counts) == SLOWER_NODES and max(counts.values()) == 1


async def test_duplicate_queue_entries_run_once(api_only: Daemon) -> None:
    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOW)
    run_id = await submit(api_only, key, "slow", "t")
    await services.queue.enqueue(run_id)  # e.g. an XADD retried after a lost reply
    async with running_workers(services):
        await wait_for(lambda: _is(status_of(api_only, run_id), "succeeded"))
        await wait_for(lambda: _true_async(services.redis.xlen(services.queue.keys.queue()), 0))
    events = await journal(services.store, run_id)
    assert sum(isinstance(e, RunStarted) for e in events) == 1
    assert max(finished_counts(events).values()) == 1


async def test_a_run_without_a_program_fails_clearly(api_only: Daemon) -> None:
    services = api_only.services
    await api_only.tenant("acme")
    record = RunRecord(run_id="orphan", graph="x", tenant="acme", source=source_of("0" * 64))
    await services.store.create_run(record)
    await services.queue.enqueue("orphan")
    async with running_workers(services):
        await wait_for(lambda: _is(status_of(api_only, "orphan"), "failed"))
    final = await services.store.get_run("orphan")
    assert final is not None and "no workflow definition" in (final.error or "")


# -- helpers -------------------------------------------------------------------------------


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def _true(value: bool) -> bool:
    return value


async def _true_async(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _finished_at_least(daemon: Daemon, run_id: str, n: int) -> bool:
    return len(finished_counts(await journal(daemon.services.store, run_id))) >= n


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def test_cancelling_the_worker_task_leaves_runs_resumable(api_only: Daemon) -> None:
    """A worker torn down from outside (not via stop()) must not mark its runs cancelled:
    the runs are its tenants', not the worker's."""
    import anyio

    from treadle.runtime.daemon.worker_process import run_workers

    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOWER)
    run_id = await submit(api_only, key, "slow", "t")
    async with anyio.create_task_group() as tg:
        await tg.start(run_workers, services, 1)
        await wait_for(lambda: _finished_at_least(api_only, run_id, 2))
        tg.cancel_scope.cancel()
    assert await status_of(api_only, run_id) == "running"
    async with running_workers(services):
        await wait_for(lambda: _is(status_of(api_only, run_id), "succeeded"))
    counts = finished_counts(await journal(services.store, run_id))
    assert len(counts) == SLOWER_NODES and max(counts.values()) == 1


async def test_the_run_continues_the_trace_of_the_submit_request(api_only: Daemon) -> None:
    import anyio

    from treadle.runtime.daemon.quotas import UsageLedger
    from treadle.runtime.daemon.worker_process import build_worker
    from treadle.runtime.observe.tracing import OtelTracer

    services = api_only.services
    key = await api_only.tenant("acme")
    await api_only.register(key, SLOW)
    trace_id, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with api_only.client(key) as c:
        resp = await c.post(
            "/v1/runs",
            json={"workflow": "slow", "inputs": {"topic": "t"}},
            headers={"traceparent": f"00-{trace_id}-{parent_span}-01"},
        )
    run_id = resp.json()["run_id"]
    tracer, exporter = OtelTracer.in_memory()
    worker = build_worker(services, UsageLedger(services.redis, services.keys), tracer=tracer)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await wait_for(lambda: _is(status_of(api_only, run_id), "succeeded"))
        worker.stop()
    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.name.startswith("invoke_workflow ")]
    assert len(runs) == 1 and runs[0].attributes["treadle.run_id"] == run_id
    assert f"{runs[0].context.trace_id:032x}" == trace_id
    assert runs[0].parent is not None and f"{runs[0].parent.span_id:016x}" == parent_span
    assert {f"{s.context.trace_id:032x}" for s in spans} == {trace_id}
    tracer.shutdown()
