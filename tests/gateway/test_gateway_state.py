"""State and failure: tenant accounting and the program table live in Redis, so a
restarted gateway resumes fair shares; a gateway killed mid-run loses no run (the
workers' `gateway` backend sends the call again to the restarted one)."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
from gateway_support import MODEL, GatewayProcess, SimServers, gateway_over, replicas

from treadle import Graph, Runtime, ScriptRule
from treadle.backends.openai_compat.gateway_client import GatewayBackend
from treadle.runtime.gateway.state import tenant_rows
from treadle.testing.processes import free_port

pytestmark = pytest.mark.anyio

LONG = ScriptRule(match="hold|of big", content=" ".join(f"w{i}" for i in range(3000)))
ONE_SLOT = {"model_options": {"max_in_flight": 1}}


async def _call(
    http: httpx.AsyncClient, program: str, *, max_tokens: int = 8, last: bool = False
) -> None:
    r = await http.post(
        "/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question of {program}"}],
            "max_tokens": max_tokens,
            "treadle": {"program_id": program, "tenant": "acme", "last_llm_step": last},
        },
    )
    assert r.status_code == 200, r.text


async def _order_after_a_busy_slot(sims: SimServers, redis_url: str | None) -> list[str]:
    """Queue the next call of program `big` and then the first of a new program `small`
    behind a call that holds the only slot, free the slot, and return the programs in
    the order their calls were sent."""
    async with gateway_over(sims.urls, redis_url=redis_url, **ONE_SLOT) as (svc, url):
        sent_before = len(sims.recorded[0].headers)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            hold = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hold the slot"}],
                "max_tokens": 3000,
                "stream": True,
                "treadle": {"tenant": "other"},
            }
            async with http.stream("POST", "/chat/completions", json=hold) as r:
                pieces = r.aiter_raw()
                await anext(pieces)  # it runs (kept open: not read to its end)
                async with anyio.create_task_group() as tg:
                    for n, program in enumerate(("big", "small"), start=1):
                        tg.start_soon(functools.partial(_call, http, program, last=True))
                        with anyio.fail_after(10):
                            while svc.gateway.scheduler.waiting() < n:
                                await anyio.sleep(0.01)
                    await pieces.aclose()  # the client leaves, the slot frees: the
                    await r.aclose()  # scheduler picks the order now
    sent = sims.recorded[0].headers[sent_before + 1 :]
    return [h["x-request-id"].split("#")[0] for h in sent]


async def _history(sims: SimServers, redis_url: str | None) -> float:
    """Program `big` has a long call (past the first least-attained-service level), and
    the tenant some short ones; returns the tenant's service."""
    async with gateway_over(sims.urls, redis_url=redis_url, **ONE_SLOT) as (svc, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await _call(http, "big", max_tokens=1100)
            for i in range(3):
                await _call(http, f"short-{i}", last=True)
        sched = svc.gateway.scheduler.scheduler
        assert sched.programs["big"].level >= 1
        return sched.tenants["acme"].service_s


async def test_a_restarted_gateway_resumes_programs_and_shares(redis_url: str) -> None:
    async with replicas(1, rules=[LONG], speed=50.0) as sims:
        service = await _history(sims, redis_url)
        client = aioredis.Redis.from_url(redis_url)
        try:
            rows = tenant_rows(await client.hgetall("treadle:gateway:tenants"))
            programs = await client.hkeys("treadle:gateway:programs")
        finally:
            await client.aclose()
        assert rows["acme"]["service_s"] == pytest.approx(service)
        assert programs == [b"big"]  # the short ones ended: only open programs are kept
        # a new gateway knows `big` has had its share: the new program goes first
        assert await _order_after_a_busy_slot(sims, redis_url) == ["small", "big"]
        async with gateway_over(sims.urls, redis_url=redis_url) as (svc, _):
            tenant = svc.gateway.scheduler.scheduler.tenants["acme"]
            assert tenant.service_s > service  # accounting went on across the restart


async def test_without_redis_a_restart_forgets_what_programs_had(redis_url: str) -> None:
    """The control of the test above: the same history, no state kept: `big` looks new
    again and goes first (it came first)."""
    async with replicas(1, rules=[LONG], speed=50.0) as sims:
        await _history(sims, None)
        assert await _order_after_a_busy_slot(sims, None) == ["big", "small"]


async def test_a_gateway_killed_mid_run_loses_no_run(tmp_path: Path, redis_url: str) -> None:
    steps = 6
    rules = [ScriptRule(match=f"step {i}", content=f"done {i}") for i in range(steps)]
    g = Graph("chain", inputs={"topic": str})
    prev = g.input.topic
    for i in range(steps):
        prev = g.llm(f"s{i}", f"step {i} after {{p}}", inputs={"p": prev}).out
    g.output(last=prev)
    async with replicas(2, rules=rules, speed=2.0) as sims:
        port = free_port()
        args = ["--dialect", "sim", "--model", MODEL, "--redis", redis_url]
        for u in sims.urls:
            args += ["--replica", u]
        gw = await GatewayProcess(args, port, tmp_path / "gateway.log").start()
        try:
            async with GatewayBackend(gw.url, MODEL, outage_s=30.0) as backend:
                runtime = Runtime(models={"default": backend})
                result_box: list[object] = []

                async def run() -> None:
                    result_box.append(await runtime.run(g, {"topic": "x"}, tenant="acme"))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    with anyio.fail_after(20):  # kill once the run is under way
                        while sum(len(r.headers) for r in sims.recorded) < 2:
                            await anyio.sleep(0.01)
                    await anyio.to_thread.run_sync(gw.kill)
                    await anyio.sleep(0.3)
                    await gw.start()
                result = result_box[0]
                assert result.output.last == f"done {steps - 1}"  # type: ignore[attr-defined]
                assert backend.resent >= 1
        finally:
            await anyio.to_thread.run_sync(gw.stop)
