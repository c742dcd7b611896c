"""Crash recovery against real processes: worker processes SIGKILLed at random points, and
Redis killed and restarted on its append-only file. No run is lost, no finished node runs
again, and every run ends with the output an uninterrupted run gives."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from daemon_support import (
    Daemon,
    WorkerProcess,
    finished_counts,
    journal,
    make_config,
    open_daemon,
    slow_workflow,
    submit,
)

from treadle.graphs.files.loader import load_workflow_text
from treadle.runtime.core.events import RunStarted
from treadle.runtime.core.store import TERMINAL
from treadle.runtime.execution.runtime import Runtime

pytestmark = pytest.mark.anyio

NODES = 10  # slow_workflow(steps=8): s0..s7, fa, fb


async def reference_outputs(topics: list[str]) -> dict[str, Any]:
    """What uninterrupted runs give (the scripted model answers by prompt, so the latency
    does not matter)."""
    runtime = Runtime()
    graph = runtime.compile(load_workflow_text(slow_workflow(latency_s=0.0)))
    out: dict[str, Any] = {}

    async def one(topic: str) -> None:
        out[topic] = (await runtime.run(graph, {"topic": topic})).output.model_dump(mode="json")

    async with anyio.create_task_group() as tg:
        for topic in topics:
            tg.start_soon(one, topic)
    return out


async def all_terminal(daemon: Daemon, run_ids: list[str]) -> bool:
    for run_id in run_ids:
        record = await daemon.services.store.get_run(run_id)
        if record is None or record.status not in TERMINAL:
            return False
    return True


async def some_progress(daemon: Daemon, run_ids: list[str], nodes: int) -> bool:
    for run_id in run_ids:
        if len(finished_counts(await journal(daemon.services.store, run_id))) >= nodes:
            return True
    return False


async def mid_way(daemon: Daemon, run_ids: list[str]) -> bool:
    """Whether some run has finished a node but not the run."""
    for run_id in run_ids:
        record = await daemon.services.store.get_run(run_id)
        if record is None or record.status in TERMINAL:
            continue
        if finished_counts(await journal(daemon.services.store, run_id)):
            return True
    return False


async def check_runs(daemon: Daemon, run_ids: dict[str, str]) -> int:
    """Every run succeeded with the reference output and no node finished twice; returns
    how many runs were resumed from their journal."""
    expected = await reference_outputs(list(run_ids))
    resumed = 0
    for topic, run_id in run_ids.items():
        record = await daemon.services.store.get_run(run_id)
        assert record is not None and record.status == "succeeded", (run_id, record)
        assert record.output == expected[topic]
        events = await journal(daemon.services.store, run_id)
        counts = finished_counts(events)
        assert len(counts) == NODES and max(counts.values()) == 1, counts
        resumed += any(isinstance(e, RunStarted) and e.resumed for e in events)
    return resumed


async def test_sigkilled_workers_lose_no_run_and_repeat_no_node(
    api_only: Daemon, worker_processes: list[WorkerProcess], tmp_path: Path
) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key, slow_workflow(latency_s=0.08))
    topics = [f"topic {i}" for i in range(24)]
    run_ids = {t: await submit(api_only, key, "slow", t) for t in topics}
    url = api_only.config.redis_url
    for _ in range(2):
        worker_processes.append(WorkerProcess(url, tmp_path, lease_ms=800, concurrency=3).start())
    started = {id(w): time.monotonic() for w in worker_processes}
    rng = random.Random(20261121)
    kills = 0
    with anyio.fail_after(90):
        while not await all_terminal(api_only, list(run_ids.values())):
            if kills < 8 and await mid_way(api_only, list(run_ids.values())):
                # a random moment while runs are half done, in the worker that has been up
                # longest (a fresh one may still be importing, holding nothing)
                await anyio.sleep(rng.uniform(0.0, 0.3))
                victim = min(worker_processes, key=lambda w: started[id(w)])
                victim.kill()  # SIGKILL: no cleanup, the lease just expires
                victim.start()
                started[id(victim)] = time.monotonic()
                kills += 1
            await anyio.sleep(0.05)
    resumed = await check_runs(api_only, run_ids)
    assert kills >= 4, f"only {kills} kills landed before the runs were done"
    assert resumed >= 1, "no kill landed mid-run: the test proved nothing"


async def test_redis_restart_on_its_append_only_file_loses_nothing(
    aof_redis: Any, worker_processes: list[WorkerProcess], tmp_path: Path
) -> None:
    config = make_config(aof_redis.url, lease_ms=1500)
    async for daemon in open_daemon(config, workers=1):
        key = await daemon.tenant("acme")
        await daemon.register(key, slow_workflow(latency_s=0.08))
        worker_processes.append(
            WorkerProcess(aof_redis.url, tmp_path, lease_ms=1500, concurrency=4).start()
        )
        topics = [f"restart {i}" for i in range(12)]
        run_ids = {t: await submit(daemon, key, "slow", t) for t in topics}
        # kill it while runs are half done
        with anyio.fail_after(20):
            while not await some_progress(daemon, list(run_ids.values()), nodes=3):
                await anyio.sleep(0.02)
        assert not await all_terminal(daemon, list(run_ids.values()))
        aof_redis.kill()  # SIGKILL: only what was fsynced survives
        await anyio.sleep(0.5)
        aof_redis.start()
        with anyio.fail_after(60):
            while not await all_terminal(daemon, list(run_ids.values())):
                await anyio.sleep(0.1)
        await check_runs(daemon, run_ids)
        # tenants, keys and registered workflows came back too
        async with daemon.client(key) as c:
            assert [w["name"] for w in (await c.get("/v1/workflows")).json()["workflows"]] == [
                "slow"
            ]
            listed = (await c.get("/v1/runs", params={"limit": 100})).json()["runs"]
        assert {r["run_id"] for r in listed} == set(run_ids.values())
