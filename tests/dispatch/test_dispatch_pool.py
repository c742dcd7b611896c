"""ReplicaPool: routing, retries on another replica, circuit breaking, health checks.

Replicas are real backends: `ScriptedBackend` subclasses that fail on demand, and an httpx
client talking to a real local HTTP server (uvicorn) or to a port where nothing listens.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException

from treadle.backends.base import (
    BackendError,
    Capabilities,
    LLMRequest,
    LLMResponse,
    Message,
    SchedulingHints,
    StreamChunk,
    Usage,
    collect_stream,
)
from treadle.backends.dispatch.pool import BreakerState, CircuitBreaker, ReplicaPool
from treadle.backends.scripted import ScriptedBackend, ScriptRule


def request(text: str = "hello", **hints: Any) -> LLMRequest:
    return LLMRequest(
        model="m",
        messages=[Message(role="user", content=text)],
        hints=SchedulingHints(**hints),
    )


class FlakyBackend(ScriptedBackend):
    """A scripted replica that raises `failures` errors before answering again."""

    def __init__(
        self,
        reply: str,
        *,
        failures: int = 0,
        retryable: bool = True,
        caps: Capabilities | None = None,
    ):
        super().__init__([ScriptRule(match="", content=reply)])
        self.failures = failures
        self.retryable = retryable
        self.seen = 0
        self._caps = caps

    @property
    def capabilities(self) -> Capabilities:
        return self._caps or super().capabilities

    async def generate(self, request: LLMRequest) -> LLMResponse:
        self.seen += 1
        if self.failures > 0:
            self.failures -= 1
            raise BackendError("engine overloaded", retryable=self.retryable)
        return await super().generate(request)


class HealthBackend(FlakyBackend):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.ok = True
        self.probes = 0

    async def health(self) -> bool:
        self.probes += 1
        return self.ok


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- routing and retries -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_retries_a_retryable_error_on_another_replica() -> None:
    bad, good = FlakyBackend("from a", failures=1), FlakyBackend("from b")
    pool = ReplicaPool([bad, good], policy="round_robin", names=["a", "b"])
    response = await pool.generate(request())
    assert response.content == "from b" and response.replica == "b"
    assert bad.seen == 1 and good.seen == 1
    status = {s.name: s for s in pool.status()}
    assert status["a"].consecutive_failures == 1 and "engine overloaded" in (
        status["a"].last_error or ""
    )
    assert status["a"].breaker == "closed"
    assert all(s.in_flight == 0 for s in pool.status())


@pytest.mark.anyio
async def test_non_retryable_error_is_raised_without_another_attempt() -> None:
    bad, good = FlakyBackend("a", failures=1, retryable=False), FlakyBackend("b")
    pool = ReplicaPool([bad, good], policy="round_robin", names=["a", "b"])
    with pytest.raises(BackendError) as info:
        await pool.generate(request())
    assert info.value.replica == "a" and not info.value.retryable
    assert good.seen == 0
    # a bad request says nothing about the replica
    assert pool.status()[0].consecutive_failures == 0


@pytest.mark.anyio
async def test_treadle_policy_sends_a_shared_prefix_to_the_same_replica() -> None:
    replicas = [FlakyBackend(f"r{i}") for i in range(4)]
    pool = ReplicaPool(replicas, policy="treadle")
    system = "You are the planner of a long-running agent. " * 30
    first = await pool.generate(request(system + "task one"))
    second = await pool.generate(request(system + "task two, a different one"))
    assert first.replica == second.replica
    third = await pool.generate(request("unrelated prompt " * 50))
    assert third.replica != first.replica  # the idle replicas are cheaper for new content


# -- circuit breaker -----------------------------------------------------------------------------


def test_circuit_breaker_transitions() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10.0, clock=clock)
    assert breaker.state is BreakerState.CLOSED
    breaker.on_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.can_execute()
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.can_execute()
    clock.t += 9.9
    assert breaker.state is BreakerState.OPEN and breaker.retry_in_s() == pytest.approx(0.1)
    clock.t += 0.1
    assert breaker.state is BreakerState.HALF_OPEN and breaker.can_execute()
    breaker.on_attempt()
    assert not breaker.can_execute()  # one trial at a time
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN  # the trial failed: open again
    clock.t += 10.0
    breaker.on_attempt()
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0


@pytest.mark.anyio
async def test_pool_opens_breaker_and_recovers_after_cooldown() -> None:
    clock = FakeClock()
    bad, good = FlakyBackend("a", failures=2), FlakyBackend("b")
    pool = ReplicaPool(
        [bad, good],
        policy="round_robin",
        names=["a", "b"],
        failure_threshold=2,
        cooldown_s=30.0,
        clock=clock,
    )
    for _ in range(4):
        assert (await pool.generate(request())).replica == "b"
    assert bad.seen == 2  # tried twice, then its breaker opened and it was skipped
    assert pool.status()[0].breaker == "open"
    clock.t += 30.0
    assert pool.status()[0].breaker == "half-open"
    replicas = {(await pool.generate(request())).replica for _ in range(2)}
    assert "a" in replicas  # the trial request went to a and succeeded
    assert pool.status()[0].breaker == "closed"


@pytest.mark.anyio
async def test_all_replicas_down_gives_a_clear_error() -> None:
    clock = FakeClock()
    a, b = FlakyBackend("a", failures=10), HealthBackend("b")
    b.ok = False
    pool = ReplicaPool(
        [a, b],
        policy="least_load",
        names=["alpha", "beta"],
        failure_threshold=1,
        cooldown_s=60.0,
        clock=clock,
    )
    assert await pool.check_health() == {"beta": False}
    with pytest.raises(BackendError) as info:
        await pool.generate(request())
    message = str(info.value)
    assert "no usable replica among 2" in message
    assert "alpha: breaker open" in message and "engine overloaded" in message
    assert "beta: breaker closed" in message and "health check failing" in message
    assert info.value.retryable
    # still down for the next request, without touching alpha again
    with pytest.raises(BackendError, match=r"retry in 60\.0s"):
        await pool.generate(request())
    assert a.seen == 1


# -- health checks ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_health_checks_take_a_replica_out_and_back() -> None:
    a, b = HealthBackend("a"), HealthBackend("b")
    pool = ReplicaPool([a, b], policy="round_robin", names=["a", "b"])
    a.ok = False
    assert await pool.check_health() == {"a": False, "b": True}
    assert {(await pool.generate(request())).replica for _ in range(4)} == {"b"}
    a.ok = True
    await pool.check_health()
    assert {(await pool.generate(request())).replica for _ in range(4)} == {"a", "b"}


@pytest.mark.anyio
async def test_background_health_loop_runs_while_entered() -> None:
    a, b = HealthBackend("a"), FlakyBackend("b")  # b has no health(): never probed
    a.ok = False
    async with ReplicaPool(
        [a, b], policy="round_robin", names=["a", "b"], health_interval_s=0.01
    ) as pool:
        with anyio.fail_after(5):
            while a.probes < 2:
                await anyio.sleep(0.01)
        assert pool.status()[0].healthy is False
        assert (await pool.generate(request())).replica == "b"
        a.ok = True
        with anyio.fail_after(5):
            while not pool.status()[0].healthy:
                await anyio.sleep(0.01)
    probes = a.probes
    await anyio.sleep(0.05)
    assert a.probes == probes  # the loop stopped with the context


@pytest.mark.anyio
async def test_health_probe_that_raises_marks_unhealthy() -> None:
    class Broken(HealthBackend):
        async def health(self) -> bool:
            raise RuntimeError("probe exploded")

    pool = ReplicaPool([Broken("x"), FlakyBackend("y")], names=["x", "y"])
    assert await pool.check_health() == {"x": False}
    assert "probe exploded" in (pool.status()[0].last_error or "")


# -- capabilities and streaming --------------------------------------------------------------


def test_capabilities_intersect_hints_and_union_reports() -> None:
    a = FlakyBackend(
        "a", caps=Capabilities(streaming=True, priority=True, prefix_cache=True, metrics=False)
    )
    b = FlakyBackend(
        "b", caps=Capabilities(streaming=True, priority=False, prefix_cache=False, metrics=True)
    )
    caps = ReplicaPool([a, b]).capabilities
    assert caps.streaming and not caps.priority
    assert caps.prefix_cache and caps.metrics


@pytest.mark.anyio
async def test_stream_retries_before_the_first_chunk() -> None:
    class StreamFails(FlakyBackend):
        async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
            raise BackendError("stream refused", retryable=True)
            yield StreamChunk()  # pragma: no cover - makes this an async generator

    pool = ReplicaPool(
        [StreamFails("a"), FlakyBackend("b b b")], policy="round_robin", names=["a", "b"]
    )
    response = await collect_stream(pool.stream(request()))
    assert response.content == "b b b"
    assert pool.status()[0].consecutive_failures == 1


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        ReplicaPool([])
    with pytest.raises(ValueError, match="names"):
        ReplicaPool([FlakyBackend("a")], names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        ReplicaPool([FlakyBackend("a"), FlakyBackend("b")], names=["a", "a"])
    with pytest.raises(ValueError, match="unknown routing policy"):
        ReplicaPool([FlakyBackend("a")], policy="nope")


# -- over real HTTP --------------------------------------------------------------------------


class HttpReplica:
    """A minimal OpenAI-style client: the pool must cope with real transport errors."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def generate(self, request: LLMRequest) -> LLMResponse:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as client:
            r = await client.post(
                "/v1/chat/completions", json={"messages": [m.to_openai() for m in request.messages]}
            )
        if r.status_code >= 500:
            raise BackendError(f"HTTP {r.status_code}", retryable=True)
        body = r.json()
        return LLMResponse(content=body["content"], usage=Usage(**body["usage"]))

    async def health(self) -> bool:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as client:
            return (await client.get("/health")).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def http_server() -> Iterator[tuple[str, dict[str, bool]]]:
    flags = {"fail": False, "healthy": True}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        if flags["fail"]:
            raise HTTPException(status_code=503, detail="overloaded")
        return {
            "content": "served over http",
            "usage": {"prompt_tokens": 3, "completion_tokens": 3},
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        if not flags["healthy"]:
            raise HTTPException(status_code=503, detail="draining")
        return {"status": "ok"}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test HTTP server did not start")
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", flags
    server.should_exit = True
    thread.join(timeout=5)


@pytest.mark.anyio
async def test_connection_refused_goes_to_the_live_server(
    http_server: tuple[str, dict[str, bool]],
) -> None:
    url, flags = http_server
    dead = HttpReplica(f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    pool = ReplicaPool(
        [dead, HttpReplica(url)], policy="round_robin", names=["dead", "live"], failure_threshold=1
    )
    response = await pool.generate(request())
    assert response.content == "served over http" and response.replica == "live"
    status = pool.status()
    assert status[0].breaker == "open" and "ConnectError" in (status[0].last_error or "")
    # HTTP 503 is a retryable BackendError; with the dead one open, nothing is left
    flags["fail"] = True
    try:
        with pytest.raises(BackendError, match="dead: breaker open"):
            await pool.generate(request())
    finally:
        flags["fail"] = False


@pytest.mark.anyio
async def test_http_health_checks(http_server: tuple[str, dict[str, bool]]) -> None:
    url, flags = http_server
    pool = ReplicaPool(
        [HttpReplica(url), HttpReplica(f"http://127.0.0.1:{_free_port()}")], names=["up", "down"]
    )
    flags["healthy"] = False
    try:
        assert await pool.check_health() == {"up": False, "down": False}
    finally:
        flags["healthy"] = True
    assert await pool.check_health() == {"up": True, "down": False}
    assert "ConnectError" in (pool.status()[1].last_error or "")
    assert (await pool.generate(request())).replica == "up"


# -- over simulated engines (real-time SimBackend replicas) -------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("policy", "expect_hit"), [("treadle", True), ("round_robin", False)])
async def test_prefix_routing_turns_into_engine_cache_hits(policy: str, expect_hit: bool) -> None:
    from treadle.backends.sim.backend import SimBackend
    from treadle.backends.sim.tokenizer import SIM_TOKENS

    replicas = [SimBackend(name=f"sim-{i}", speed=50.0) for i in range(3)]
    # the simulator's tokenizer: routing hashes the very blocks the simulated engines cache
    pool = ReplicaPool(replicas, policy=policy, names=[r.name for r in replicas], tokens=SIM_TOKENS)
    system = "You are the coding agent of a large repository. Follow the style guide. " * 40
    first = await pool.generate(request(system + "Fix the failing test in module one."))
    second = await pool.generate(request(system + "Now add a docstring to module two."))
    assert first.usage.cached_prompt_tokens == 0
    if expect_hit:
        # same replica, and the engine really served the shared prefix from its cache
        assert second.replica == first.replica
        assert second.usage.cached_prompt_tokens > 0.8 * first.usage.prompt_tokens
    else:
        assert second.replica != first.replica
        assert second.usage.cached_prompt_tokens == 0


@pytest.mark.anyio
async def test_max_attempts_bounds_the_replicas_tried() -> None:
    backends = [FlakyBackend(n, failures=1) for n in "abc"]
    pool = ReplicaPool(backends, policy="round_robin", names=list("abc"), max_attempts=2)
    with pytest.raises(BackendError, match=r"failed on 2 replicas \(max_attempts=2\)"):
        await pool.generate(request())
    assert [b.seen for b in backends] == [1, 1, 0]
