"""The daemon's workers share one scheduler through `treadle gateway`: two workers, one
gateway, two simulator replicas on loopback, two tenants weighted 2:1. Under saturation
(more calls than the gateway lets in flight) the token-time the gateway serves each tenant
is shared 2:1, whichever worker runs whose runs.

Each run is one LLM call, so a run's service is charged to its tenant when its call is
sent (a run of several calls is charged its expected service when it is admitted, which
makes completed service lag the shares by a run or two: a longer test would show the same
ratio)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from daemon_support import make_config, open_daemon, running_workers
from gateway_support import MODEL, gateway_over, replicas

from treadle.backends.scripted import ScriptRule
from treadle.runtime.sched.scheduler import DISPATCHED

pytestmark = pytest.mark.anyio

RUNS = 80  # per tenant
WEIGHTS = {"gold": 2.0, "silver": 1.0}
WORKFLOW = """\
name: ask
inputs:
  topic: str
nodes:
  - {id: answer, kind: llm, prompt: "Tell me about {t}", max_tokens: 16, inputs: {t: $input.topic}}
outputs:
  text: $answer
"""


def _waiting_by_tenant(gateway: Any) -> dict[str, int]:
    """Calls of each tenant at the gateway that are not sent yet."""
    sched = gateway.scheduler.scheduler
    out = dict.fromkeys(WEIGHTS, 0)
    for call in sched.calls.values():
        program = sched.programs.get(call.program_id)
        if call.state != DISPATCHED and program is not None and program.tenant.name in out:
            out[program.tenant.name] += 1
    return out


async def test_two_workers_share_the_gateway_by_tenant_weight(redis_url: str) -> None:
    # every answer is cut at max_tokens: the gateway's estimate of a call is exact from the
    # first call on (a guess it corrects only when a call finishes would swing the shares
    # while runs arrive in a burst; docs/gateway.md)
    answer = " ".join(f"w{i}" for i in range(40))
    async with (
        replicas(2, rules=[ScriptRule(match=".", content=answer)], speed=50.0) as sims,
        gateway_over(sims.urls, tenants=WEIGHTS, model_options={"max_in_flight": 2}) as (svc, url),
    ):
        gateway_model = {"backend": "gateway", "url": url, "model": MODEL}
        # leases long enough for a loaded machine: this loop runs the daemon, its workers,
        # the gateway and the replicas at once (a lost lease re-runs a run elsewhere)
        config = make_config(redis_url, models={"default": gateway_model})
        daemons = open_daemon(config, workers=0)
        daemon = await anext(daemons)
        try:
            keys = {name: await daemon.tenant(name) for name in WEIGHTS}
            runs: dict[str, list[str]] = {name: [] for name in WEIGHTS}
            for key in keys.values():
                await daemon.register(key, WORKFLOW)
            async with running_workers(daemon.services, 2) as workers:
                async with (
                    daemon.client(keys["gold"]) as gold,
                    daemon.client(keys["silver"]) as silver,
                ):
                    for i in range(RUNS):
                        for name, client in (("gold", gold), ("silver", silver)):
                            body = {"workflow": "ask", "inputs": {"topic": f"t{i}"}}
                            resp = await client.post("/v1/runs", json=body)
                            assert resp.status_code in (200, 201, 202), resp.text
                            runs[name].append(resp.json()["run_id"])
                # the service each tenant has had, sampled while both have calls waiting
                samples: list[dict[str, float]] = []
                with anyio.fail_after(60):
                    while True:
                        if all(_waiting_by_tenant(svc.gateway).values()):
                            samples.append(dict(svc.gateway.scheduler.service_by_tenant()))
                        elif samples:
                            break  # one tenant ran out of work: saturation is over
                        await anyio.sleep(0.01)
                for name, key in keys.items():
                    for run_id in runs[name]:
                        record = await daemon.wait_run(key, run_id, timeout_s=60)
                        assert record["status"] == "succeeded", record
            assert all(w.stats.settled > 0 for w in workers)  # both workers ran runs
        finally:
            await anext(daemons, None)  # the daemon's shutdown, in this task
    assert len(samples) > 5
    first, last = samples[0], samples[-1]
    gold_s = last["gold"] - first.get("gold", 0.0)
    silver_s = last["silver"] - first.get("silver", 0.0)
    assert gold_s / silver_s == pytest.approx(2.0, rel=0.10)
