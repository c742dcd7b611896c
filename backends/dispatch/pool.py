"""`ReplicaPool`: one `Backend` over several replicas of the same model.

Each request is routed by a policy from `treadle.backends.dispatch.routing` (prefix-aware `treadle`
by default). A replica that fails with a retryable `BackendError` or a connection error is
skipped and the request goes to another one; repeated failures open that replica's circuit
breaker (closed -> open after `failure_threshold` consecutive failures -> half-open after
`cooldown_s`, when one trial request may go -> closed on its success, open again on its
failure). Replicas that have an `async health()` method are probed every
`health_interval_s` while the pool is entered (`async with pool:`), or on demand with
`check_health()`; a failed probe takes the replica out of routing until a probe succeeds.
When no replica is usable, the error lists every replica's state.

Load tracking: a streamed request leaves the router's prefill queue at its first chunk; a
non-streamed one only when it completes (the pool cannot see its first token), so the
`treadle` policy's queueing estimate is then an upper bound.
"""

from __future__ import annotations

import enum
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import httpx

from treadle.backends.base import (
    Backend,
    BackendError,
    BackendTarget,
    Capabilities,
    LLMRequest,
    LLMResponse,
    StreamChunk,
    target_of,
)
from treadle.backends.dispatch.routing import (
    DEFAULT_CHUNK_TOKENS,
    RequestFeatures,
    Router,
    RoutingPolicy,
    Ticket,
    make_routing_policy,
)
from treadle.backends.tokens import CHARS, TokenEstimator

#: errors that mean "this replica could not be reached", worth another replica
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    OSError,
    httpx.TransportError,
)
#: a replica's own failure or an unreachable replica
REPLICA_ERRORS: tuple[type[Exception], ...] = (BackendError, *CONNECTION_ERRORS)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with one trial request when half-open."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float]):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose cooldown is over reads as half-open."""
        if (
            self._state is BreakerState.OPEN
            and self.opened_at is not None
            and self._clock() - self.opened_at >= self.cooldown_s
        ):
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def can_execute(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._trial_in_flight

    def on_attempt(self) -> None:
        """A request is being sent; in half-open state it is the one trial."""
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = True

    def release_trial(self) -> None:
        """The trial request ended without saying anything about the replica (cancelled,
        or a bad request); another may be tried."""
        self._trial_in_flight = False

    def on_success(self) -> None:
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = None
        self._trial_in_flight = False

    def on_failure(self) -> None:
        self.consecutive_failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self.opened_at = self._clock()
        self._trial_in_flight = False

    def retry_in_s(self) -> float:
        if self._state is not BreakerState.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self.opened_at))


@dataclass
class ReplicaStatus:
    """One replica as the pool sees it (also what the all-down error reports)."""

    name: str
    breaker: str
    healthy: bool
    consecutive_failures: int
    in_flight: int
    last_error: str | None
    retry_in_s: float

    def describe(self) -> str:
        parts = [f"breaker {self.breaker}"]
        if self.breaker == BreakerState.OPEN.value:
            parts.append(f"retry in {self.retry_in_s:.1f}s")
        if not self.healthy:
            parts.append("health check failing")
        if self.consecutive_failures:
            parts.append(f"{self.consecutive_failures} consecutive failures")
        if self.last_error:
            parts.append(f"last error: {self.last_error}")
        return f"{self.name}: " + ", ".join(parts)


class _Replica:
    def __init__(self, backend: Backend, name: str, breaker: CircuitBreaker):
        self.backend = backend
        self.name = name
        self.breaker = breaker
        self.healthy = True
        self.last_error: str | None = None
        health = getattr(backend, "health", None)
        self.health: Callable[[], Any] | None = (
            health if health is not None and inspect.iscoroutinefunction(health) else None
        )


class ReplicaPool:
    """A `Backend` that routes each request to one of `replicas`.

    `policy` is a name from `treadle.backends.dispatch.routing.ROUTING_POLICIES` (with
    `policy_options` for its config) or a ready `RoutingPolicy`. `max_attempts` bounds the
    replicas tried per request (default: all of them). `tokens` estimates prompts' tokens
    and cuts them into prefix chunks (the default counts characters; give the engine's
    tokenizer, where you have it, for exact chunks). `clock` is injectable for tests."""

    def __init__(
        self,
        replicas: Sequence[Backend],
        *,
        policy: str | RoutingPolicy = "treadle",
        names: Sequence[str] | None = None,
        health_interval_s: float = 10.0,
        health_timeout_s: float = 5.0,
        failure_threshold: int = 3,
        cooldown_s: float = 30.0,
        max_attempts: int | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        tokens: TokenEstimator = CHARS,
        policy_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not replicas:
            raise ValueError("ReplicaPool needs at least one replica")
        if names is None:
            names = [f"replica-{i}" for i in range(len(replicas))]
        names = list(names)
        if len(names) != len(replicas):
            raise ValueError(f"{len(names)} names for {len(replicas)} replicas")
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique, got {names}")
        if health_interval_s <= 0:
            raise ValueError(f"health_interval_s must be positive, got {health_interval_s}")
        self._clock = clock
        self._replicas = [
            _Replica(b, n, CircuitBreaker(failure_threshold, cooldown_s, clock))
            for b, n in zip(replicas, names, strict=True)
        ]
        if isinstance(policy, str):
            policy = make_routing_policy(policy, len(replicas), **(policy_options or {}))
        elif policy_options:
            raise ValueError("policy_options apply only to a policy given by name")
        self.router = Router(policy, names)
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.max_attempts = max_attempts or len(replicas)
        self.chunk_tokens = chunk_tokens
        self.tokens = tokens
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- Backend -------------------------------------------------------------------------

    @property
    def target(self) -> BackendTarget:
        """The replicas' provider and model (the first replica's: a pool serves one model);
        no one server."""
        first = target_of(self._replicas[0].backend)
        return BackendTarget(provider=first.provider, model=first.model)

    @property
    def capabilities(self) -> Capabilities:
        """What every replica can do for hints (intersection); what any replica reports
        (union) for the prefix cache and metrics."""
        caps = [r.backend.capabilities for r in self._replicas]
        return Capabilities(
            streaming=all(c.streaming for c in caps)
            and all(callable(getattr(r.backend, "stream", None)) for r in self._replicas),
            tool_calls=all(c.tool_calls for c in caps),
            prefix_cache=any(c.prefix_cache for c in caps),
            priority=all(c.priority for c in caps),
            pin_ttl=all(c.pin_ttl for c in caps),
            program_id=all(c.program_id for c in caps),
            metrics=any(c.metrics for c in caps),
        )

    async def generate(self, request: LLMRequest) -> LLMResponse:
        features = self._features(request)
        tried: set[int] = set()
        while True:
            ticket, replica = self._pick(features, tried)
            try:
                response = await replica.backend.generate(request)
            except REPLICA_ERRORS as exc:
                retryable = not isinstance(exc, BackendError) or exc.retryable
                self._failed(ticket, replica, exc, counts=retryable)
                if not retryable:
                    raise BackendError(
                        f"replica {replica.name}: {exc}", retryable=False, replica=replica.name
                    ) from exc
                tried.add(ticket.replica)
                continue
            except BaseException:
                # cancelled or a bug in the replica: not the replica's health, but the
                # router must not count the request as in flight forever
                self.router.finish(ticket, now=self._clock(), ok=False)
                replica.breaker.release_trial()
                raise
            self._succeeded(ticket, replica, response.usage.cached_prompt_tokens)
            return response.model_copy(update={"replica": replica.name})

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        """Stream from one replica; failures before the first chunk go to another replica,
        a failure after it is raised (the chunks already yielded cannot be taken back)."""
        features = self._features(request)
        tried: set[int] = set()
        while True:
            ticket, replica = self._pick(features, tried)
            stream_fn = getattr(replica.backend, "stream", None)
            if stream_fn is None:
                self.router.finish(ticket, now=self._clock(), ok=False)
                raise BackendError(f"replica {replica.name} cannot stream", replica=replica.name)
            started = False
            cached: int | None = None
            try:
                async for chunk in stream_fn(request):
                    if not started:
                        started = True
                        self.router.prefill_done(ticket)
                    if chunk.usage is not None:
                        cached = chunk.usage.cached_prompt_tokens
                    yield chunk
            except REPLICA_ERRORS as exc:
                retryable = not isinstance(exc, BackendError) or exc.retryable
                self._failed(ticket, replica, exc, counts=retryable)
                if started or not retryable:
                    raise BackendError(
                        f"replica {replica.name}: {exc}",
                        retryable=retryable and not started,
                        replica=replica.name,
                    ) from exc
                tried.add(ticket.replica)
                continue
            except BaseException:
                self.router.finish(ticket, now=self._clock(), ok=False)
                replica.breaker.release_trial()
                raise
            self._succeeded(ticket, replica, cached)
            return

    # -- routing and bookkeeping -----------------------------------------------------------

    def _features(self, request: LLMRequest) -> RequestFeatures:
        return RequestFeatures.from_request(
            request, chunk_tokens=self.chunk_tokens, now=self._clock(), tokens=self.tokens
        )

    def _usable(self, replica: _Replica) -> bool:
        return replica.healthy and replica.breaker.can_execute()

    def _pick(self, features: RequestFeatures, tried: set[int]) -> tuple[Ticket, _Replica]:
        if len(tried) >= self.max_attempts:
            raise self._exhausted(tried)
        any_usable = False
        for i, replica in enumerate(self._replicas):
            usable = i not in tried and self._usable(replica)
            self.router.set_available(i, usable)
            any_usable = any_usable or usable
        if not any_usable:
            raise self._exhausted(tried)
        ticket = self.router.route(features)
        replica = self._replicas[ticket.replica]
        replica.breaker.on_attempt()
        return ticket, replica

    def _failed(
        self, ticket: Ticket, replica: _Replica, exc: BaseException, *, counts: bool
    ) -> None:
        self.router.finish(ticket, now=self._clock(), ok=False)
        replica.last_error = f"{type(exc).__name__}: {exc}"
        if counts:
            replica.breaker.on_failure()
        else:
            # a bad request says nothing about the replica's health
            replica.breaker.release_trial()

    def _succeeded(self, ticket: Ticket, replica: _Replica, cached_tokens: int | None) -> None:
        replica.breaker.on_success()
        self.router.finish(ticket, now=self._clock(), cached_tokens=cached_tokens, ok=True)

    def _exhausted(self, tried: set[int]) -> BackendError:
        lines = []
        for i, status in enumerate(self.status()):
            note = " (failed for this request)" if i in tried else ""
            lines.append(status.describe() + note)
        if len(tried) >= self.max_attempts and len(tried) < len(self._replicas):
            head = f"request failed on {len(tried)} replicas (max_attempts={self.max_attempts})"
        else:
            head = f"no usable replica among {len(self._replicas)}"
        return BackendError(head + ": " + "; ".join(lines), retryable=True)

    def status(self) -> list[ReplicaStatus]:
        """Every replica's breaker, health and load, in pool order."""
        out = []
        for replica, state in zip(self._replicas, self.router.states, strict=True):
            out.append(
                ReplicaStatus(
                    name=replica.name,
                    breaker=replica.breaker.state.value,
                    healthy=replica.healthy,
                    consecutive_failures=replica.breaker.consecutive_failures,
                    in_flight=state.in_flight,
                    last_error=replica.last_error,
                    retry_in_s=replica.breaker.retry_in_s(),
                )
            )
        return out

    # -- health checks ----------------------------------------------------------------------

    async def check_health(self) -> dict[str, bool]:
        """Probe every replica that has `async health()`, concurrently; returns name -> ok.

        `health()` returning False or raising, or taking longer than `health_timeout_s`,
        marks the replica unhealthy; a later successful probe brings it back."""
        results: dict[str, bool] = {}

        async def probe(replica: _Replica) -> None:
            assert replica.health is not None
            ok = False
            try:
                with anyio.fail_after(self.health_timeout_s):
                    outcome = await replica.health()
                ok = outcome is None or bool(outcome)
                if not ok:
                    replica.last_error = "health check returned false"
            except Exception as exc:  # every probe failure is reported, none is fatal
                replica.last_error = f"health check: {type(exc).__name__}: {exc}"
            replica.healthy = ok
            results[replica.name] = ok

        async with anyio.create_task_group() as tg:
            for replica in self._replicas:
                if replica.health is not None:
                    tg.start_soon(probe, replica)
        return results

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            await anyio.sleep(self.health_interval_s)

    async def __aenter__(self) -> ReplicaPool:
        if any(r.health is not None for r in self._replicas):
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            self._task_group.start_soon(self._health_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(exc_type, exc, tb)
            self._task_group = None
