"""Workers use the gateway: the `gateway` backend (`models: {backend: gateway, url}`)
sends a run's hints, and the gateway schedules its calls as one program of its tenant."""

from __future__ import annotations

import socket

import anyio
import pytest
from gateway_support import MODEL, config_for, gateway_over, replicas

from treadle import Graph, Runtime, ScriptRule, tool
from treadle.backends.base import LLMRequest, Message, SchedulingHints
from treadle.backends.factory import create_backend
from treadle.backends.openai_compat.dialects import GatewayDialect
from treadle.backends.openai_compat.gateway_client import GatewayBackend
from treadle.backends.openai_compat.hint_wire import HintError, WireHints
from treadle.runtime.gateway.serve import running

pytestmark = pytest.mark.anyio

RULES = [
    ScriptRule(match="Repair", tool_calls=[{"name": "run_tests", "arguments": {"path": "t/"}}]),
    ScriptRule(match="Repair", content="Fixed: the tests pass now."),
]


@tool(expected_duration_s=42.0)
async def run_tests(path: str) -> str:
    """Run the test suite under a path."""
    return f"2 passed in {path}"


def test_the_dialect_sends_every_hint_in_one_field() -> None:
    hints = SchedulingHints(
        program_id="run-7",
        request_id="run-7:agent:1",
        tenant="acme",
        next_tool="search",
        is_last_step=False,
        steps_to_execution=3,
        tool_duration_s=1.5,
        human_wait=True,
        priority=4,
    )
    body, headers = GatewayDialect().hint_fields(hints)
    assert headers == {}
    assert body == {
        "treadle": {
            "program_id": "run-7",
            "tenant": "acme",
            "steps_to_execution": 3,
            "next_tool": "search",
            "tool_duration_s": 1.5,
            "human_wait": True,
            "request_id": "run-7:agent:1",
        }
    }
    # what the gateway reads back is what was sent
    assert WireHints.parse(body["treadle"], {}).to_wire() == body["treadle"]


def test_headers_carry_the_same_hints_and_the_body_wins() -> None:
    parsed = WireHints.parse(
        {"tenant": "body"},
        {"x-treadle-tenant": "header", "x-treadle-last-llm-step": "yes", "x-other": "x"},
    )
    assert parsed.tenant == "body" and parsed.last_llm_step is True
    with pytest.raises(HintError, match="X-Treadle-Tool-Duration-S"):
        WireHints.parse(None, {"x-treadle-tool-duration-s": "soon"})


def test_a_workflow_file_entry_builds_the_backend() -> None:
    backend = create_backend({"backend": "gateway", "url": "http://gw:9000/v1"})
    assert isinstance(backend, GatewayBackend) and backend.model == "default"
    with pytest.raises(ValueError, match="url"):
        create_backend({"backend": "gateway", "url": "gw:9000"})
    with pytest.raises(ValueError, match="colour"):
        create_backend({"backend": "gateway", "url": "http://gw/v1", "colour": "red"})


async def test_a_run_is_one_program_of_its_tenant_at_the_gateway() -> None:
    g = Graph("repair", inputs={"task": str})
    node = g.llm("agent", "Repair: {task}", tools=[run_tests], inputs={"task": g.input.task})
    g.output(result=node.out)
    async with replicas(2, rules=RULES) as sims, gateway_over(sims.urls) as (svc, url):
        async with GatewayBackend(url, MODEL) as backend:
            runtime = Runtime(models={"default": backend})
            result = await runtime.run(g, {"task": "a broken import"}, tenant="acme")
        assert result.output.result == "Fixed: the tests pass now."
        sched = svc.gateway.scheduler
        info = sched.programs[result.run_id]  # open: a tool-using node may call again
        assert (info.tenant, info.calls) == ("acme", 2)
        program = sched.scheduler.programs[result.run_id]
        assert program.attained_s > 0
        # both calls of the run went to one replica (program affinity)
        assert sorted(len(r.headers) for r in sims.recorded) == [0, 2]
        assert svc.gateway.scheduler.service_by_tenant()["acme"] > 0


async def test_the_backend_waits_out_a_gateway_that_is_down() -> None:
    async with replicas(1, rules=RULES) as sims:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1"
        backend = GatewayBackend(url, MODEL, outage_s=20.0)
        request = LLMRequest(model="default", messages=[Message(role="user", content="Repair: x")])
        answers = []

        async def call() -> None:
            answers.append(await backend.generate(request))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.sleep(0.5)  # the gateway is not up yet: the call is being resent
            async with running(config_for(sims.urls), sock):
                with anyio.fail_after(15):
                    while not answers:
                        await anyio.sleep(0.05)
        await backend.aclose()
        assert answers[0].content == "Fixed: the tests pass now."
        assert backend.resent >= 1
