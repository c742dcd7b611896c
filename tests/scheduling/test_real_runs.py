"""A workflow through `Runtime(admission=SchedulerAdmission(...))` against treadle's
simulator over real HTTP (`OpenAICompatBackend(dialect="sim")` -> `backends.sim.server`
under uvicorn on a free port): pins show up both as the run's `PinSet` / `PinReleased`
events and in the server's `/metrics` (`treadle_sim_pins_*`), including a release on
cancel through `POST /v1/pins/release`."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from treadle import Graph, Runtime, ScriptRule, tool
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.runtime.core.events import PinReleased, PinSet
from treadle.runtime.sched.admission import HTTPPinReleaser, SchedulerAdmission

server_module = pytest.importorskip("treadle.backends.sim.server")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.anyio

SYSTEM = " ".join(f"Rule {i}: read the failing test before changing code." for i in range(20))


@tool(expected_duration_s=60.0)
async def run_tests(path: str) -> str:
    """Run the test suite under a path."""
    await anyio.sleep(0.01)
    return f"2 passed in {path}"


@tool(expected_duration_s=60.0)
async def build_everything(path: str) -> str:
    """A build that outlasts the run (it is cancelled first)."""
    await anyio.sleep(30)
    return "built"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sim_server() -> Iterator[tuple[str, str]]:
    rules = [
        ScriptRule(match="Repair", tool_calls=[{"name": "run_tests", "arguments": {"path": "t/"}}]),
        ScriptRule(match="Repair", content="Fixed: the tests pass now."),
        ScriptRule(
            match="Build", tool_calls=[{"name": "build_everything", "arguments": {"path": "."}}]
        ),
    ]
    (replica,) = server_module.build_replicas(1, policy="priority", rules=rules, speed=5.0)
    app = server_module.create_app(replica)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the simulator server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", replica.model
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture
def sim_url(sim_server: tuple[str, str]) -> str:
    return sim_server[0]


@pytest.fixture
async def backend(sim_server: tuple[str, str]) -> AsyncIterator[OpenAICompatBackend]:
    url, model = sim_server
    async with OpenAICompatBackend(url + "/v1", model, dialect="sim", retries=0) as b:
        yield b


def _graph(name: str, prompt: str, t: object) -> Graph:
    g = Graph(name, inputs={"task": str})
    node = g.llm("agent", prompt, system=SYSTEM, tools=[t], inputs={"task": g.input.task})
    g.output(result=node.out)
    return g


async def _pins(backend: OpenAICompatBackend) -> dict[str, float]:
    raw = (await backend.metrics()).raw
    return {k: v for k, v in raw.items() if k.startswith("treadle_sim_pins")}


async def test_pins_set_and_released_over_http(sim_url: str, backend: OpenAICompatBackend) -> None:
    before = await _pins(backend)
    graph = _graph("repair", "Repair: {task}", run_tests)
    admission = SchedulerAdmission(
        tools=[run_tests], pin_releasers={"default": HTTPPinReleaser(sim_url)}
    )
    async with admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        admission.register_graph(runtime.compile(graph))
        result = await runtime.run(graph, {"task": "a broken import"})
    assert result.output.result == "Fixed: the tests pass now."
    pin_sets = [e for e in result.events if isinstance(e, PinSet)]
    released = [e for e in result.events if isinstance(e, PinReleased)]
    assert pin_sets[0].call_id == "agent#1" and pin_sets[0].ttl_s > 1.0
    assert (released[0].call_id, released[0].reason, released[0].used) == (
        "agent#1",
        "next_call",
        True,
    )
    after = await _pins(backend)
    # the server pinned what the run reported, and holds nothing now
    set_delta = after["treadle_sim_pins_set_total"] - before.get("treadle_sim_pins_set_total", 0)
    released_delta = after["treadle_sim_pins_released_total"] - before.get(
        "treadle_sim_pins_released_total", 0
    )
    assert set_delta == len(pin_sets) >= 1
    assert released_delta == len(released) == set_delta
    assert after["treadle_sim_pins_active"] == 0
    assert after["treadle_sim_pins_expired_total"] == before.get(
        "treadle_sim_pins_expired_total", 0
    )
    assert not admission.release_errors


async def test_cancel_releases_the_pin_on_the_server(
    sim_url: str, backend: OpenAICompatBackend
) -> None:
    before = await _pins(backend)
    graph = _graph("build", "Build: {task}", build_everything)
    admission = SchedulerAdmission(
        tools=[build_everything], pin_releasers={"default": HTTPPinReleaser(sim_url)}
    )
    async with admission:
        runtime = Runtime(models={"default": backend}, admission=admission)
        async with runtime.start(graph, {"task": "everything"}) as run:
            async for event in run.events():
                if isinstance(event, PinSet):
                    assert (await _pins(backend))["treadle_sim_pins_active"] == 1
                    run.cancel()
            result = await run.result()
    assert result.status == "cancelled"
    released = [e for e in result.events if isinstance(e, PinReleased)]
    assert [(e.reason, e.used) for e in released] == [("cancelled", False)]
    after = await _pins(backend)
    assert after["treadle_sim_pins_active"] == 0
    assert after["treadle_sim_pins_released_total"] == before["treadle_sim_pins_released_total"] + 1
    assert not admission.release_errors
