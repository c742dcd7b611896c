"""Production hardening of the daemon, against a real redis-server: finished runs expire
(`retain_s`) and leave the listings cleanly, `/metrics` needs its token unless public, and
workers check the import allow-list again before loading a stored definition."""

from __future__ import annotations

import sys
from typing import Any, cast

import anyio
import pytest
from daemon_support import Daemon, make_config, open_daemon, running_workers, submit

from treadle.runtime.core.store import RunRecord
from treadle.runtime.daemon.import_allowlist import ImportAllowList
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.registry import WorkflowRegistry, definition_digest, source_of
from treadle.runtime.daemon.services import Services
from treadle.runtime.daemon.worker import ProgramError
from treadle.runtime.daemon.worker_process import allowlist_check

pytestmark = pytest.mark.anyio

FUNC = "name: x\nnodes:\n  - {{id: a, kind: func, fn: '{}', inputs: {{batches: []}}}}\n"
ALLOWED_FN = "treadle.examples.research:merge_hits"


# -- retention ---------------------------------------------------------------------------


async def test_finished_runs_expire_and_leave_the_listing(redis_url: str) -> None:
    config = make_config(redis_url, retain_s=1.0)
    async for daemon in open_daemon(config, workers=1):
        key = await daemon.tenant("acme")
        await daemon.register(key)
        run_id = await submit(daemon, key, "five", "tides")
        assert (await daemon.wait_run(key, run_id))["status"] == "succeeded"
        store = daemon.services.store
        run_keys = store.keys.run_keys(run_id)[:3]
        # the record turns terminal a moment before the worker sets the expiry (its ack)
        with anyio.fail_after(5):
            while -1 in [await store.client.pttl(k) for k in run_keys]:
                await anyio.sleep(0.01)
        for k in run_keys:  # meta, outputs, events: all exist, all expire
            assert 0 < await store.client.pttl(k) <= 1000
        with anyio.fail_after(10):
            while await store.client.exists(*run_keys):
                await anyio.sleep(0.05)
        async with daemon.client(key) as c:
            listed = await c.get("/v1/runs")
            assert listed.status_code == 200, listed.text
            assert listed.json()["runs"] == []
            assert (await c.get(f"/v1/runs/{run_id}")).status_code == 404
        assert await store.client.zscore(store.keys.tenant_runs("acme"), run_id) is None
        assert await store.client.zscore(store.keys.runs(), run_id) is None


async def test_retention_zero_keeps_runs(redis_url: str) -> None:
    async for daemon in open_daemon(make_config(redis_url, retain_s=0), workers=1):
        key = await daemon.tenant("acme")
        await daemon.register(key)
        run_id = await submit(daemon, key, "five", "tides")
        await daemon.wait_run(key, run_id)
        store = daemon.services.store
        assert [await store.client.pttl(k) for k in store.keys.run_keys(run_id)[:3]] == [-1] * 3


# -- /metrics authentication -------------------------------------------------------------


async def _metrics(daemon: Daemon, token: str | None) -> Any:
    async with daemon.client(token) as c:
        return await c.get("/metrics")


async def test_metrics_needs_the_token(redis_url: str) -> None:
    config = make_config(redis_url, metrics_public=False, metrics_token="s3cret-token")
    async for daemon in open_daemon(config, workers=0):
        for token in (None, "wrong", "s3cret-tokenX", await daemon.tenant("acme")):
            resp = await _metrics(daemon, token)
            assert resp.status_code == 401, (token, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"
            assert resp.headers["www-authenticate"].startswith("Bearer")
        ok = await _metrics(daemon, "s3cret-token")
        assert ok.status_code == 200 and "treadle_queue_entries" in ok.text
        async with daemon.client() as c:
            assert (await c.get("/healthz")).status_code == 200  # probes need no token


async def test_metrics_without_token_or_public_is_refused_clearly(redis_url: str) -> None:
    async for daemon in open_daemon(make_config(redis_url, metrics_public=False), workers=0):
        resp = await _metrics(daemon, "anything")
        assert resp.status_code == 401
        message = resp.json()["error"]["message"]
        assert "--metrics-token" in message and "--metrics-public" in message


async def test_metrics_public(redis_url: str) -> None:
    async for daemon in open_daemon(make_config(redis_url, metrics_public=True), workers=0):
        assert (await _metrics(daemon, None)).status_code == 200


def test_empty_metrics_token_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        make_config("redis://x", metrics_token=" ")


# -- the import allow-list, again in workers ---------------------------------------------


async def test_worker_refuses_a_definition_registered_before_the_allow_list_narrowed(
    redis_url: str,
) -> None:
    wide = make_config(redis_url, allow_imports=("treadle.examples",))
    async for daemon in open_daemon(wide, workers=0):
        key = await daemon.tenant("acme")
        await daemon.register(key, FUNC.format(ALLOWED_FN))
        async with daemon.client(key) as c:
            resp = await c.post("/v1/runs", json={"workflow": "x", "inputs": {}})
        assert resp.status_code == 201, resp.text
        run_id = resp.json()["run_id"]
        # the operator narrows the allow-list; a worker started with it must refuse the run
        narrow = Services.open(make_config(redis_url, allow_imports=()))
        try:
            async with running_workers(narrow):
                body = await daemon.wait_run(key, run_id)
        finally:
            await narrow.close()
        assert body["status"] == "failed"
        assert "treadle.examples.research" in body["error"]
        assert "allow-list" in body["error"]


async def test_worker_refuses_a_definition_written_to_redis_directly(redis_url: str) -> None:
    assert "this" not in sys.modules  # importing `this` prints the Zen of Python
    services = Services.open(make_config(redis_url))
    try:
        text = FUNC.format("this:s")
        digest = definition_digest(text, "yaml")
        await services.redis.hset(
            services.keys.definition(digest), mapping={"format": "yaml", "text": text}
        )
        record = RunRecord(run_id="direct1", graph="x", tenant="acme", source=source_of(digest))
        await services.store.create_run(record)
        await services.queue.enqueue("direct1")
        async with running_workers(services):
            with anyio.fail_after(20):
                while (found := await services.store.get_run("direct1")) is None or (
                    found.status == "pending"
                ):
                    await anyio.sleep(0.02)
        assert found.status == "failed"
        assert found.error is not None and "module 'this' is not allowed" in found.error
        assert "this" not in sys.modules
    finally:
        await services.close()


def test_allowlist_check_refuses_a_loaded_graph_from_a_refused_module() -> None:
    # what a worker does with a graph it already had compiled (its cache): check the spec
    wide = WorkflowRegistry(cast(Any, None), DaemonKeys(), ImportAllowList(("treadle.examples",)))
    cg = wide.prepare(FUNC.format(ALLOWED_FN), "yaml", "flow.yaml")
    record = RunRecord(run_id="r", graph="x")
    allowlist_check(ImportAllowList(("treadle.examples",)))(record, cg)  # allowed: no error
    with pytest.raises(ProgramError, match=r"treadle\.examples\.research"):
        allowlist_check(ImportAllowList(()))(record, cg)
