"""`SimBackend`: a treadle `Backend` that runs requests through a simulated engine in-process.

Content comes from a `ScriptedBackend` (rules, tool calls, schema-valid JSON); timing, token
counts, prefix-cache hits, queueing and pins come from the engine running in real time
(see `realtime.py`). Use it to exercise treadle's scheduling hints end to end without a GPU
or an HTTP hop; `treadle sim serve` offers the same replica over HTTP.

Public API (stable):

    backend = SimBackend()                                   # default profile, fcfs
    backend = SimBackend(SimReplica.create(policy="program", rules=[...], speed=10.0))
    backend = SimBackend.create(profile=..., policy=..., rules=..., speed=..., name=...)
    backend.capabilities      # streaming, tool_calls, prefix_cache, priority, pin_ttl,
                              # program_id, metrics
    await backend.generate(request) -> LLMResponse       # usage.cached_prompt_tokens, ttft_s
    async for chunk in backend.stream(request): ...      # StreamChunk
    backend.metrics() -> EngineMetrics
    backend.release_pins(program_id) -> int

Hints: `priority` (lower first, under the `priority` policy), `program_id`, `request_id`,
`pin_ttl_s`, `is_last_step` map one to one onto `SimRequest`. A request that can never fit
the replica raises `BackendError(retryable=False)`; an engine failure raises
`BackendError(retryable=True)` (another replica may serve it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from treadle.backends.base import (
    BackendError,
    Capabilities,
    LLMRequest,
    LLMResponse,
    StreamChunk,
    Usage,
)
from treadle.backends.sim.engine import EngineMetrics
from treadle.backends.sim.realtime import SimCompletion, SimReplica, SimulatorFailure


class SimBackend:
    """A `Backend` over one simulated replica (module docstring)."""

    def __init__(self, replica: SimReplica | None = None):
        self._replica = replica

    @classmethod
    def create(cls, **kwargs: Any) -> SimBackend:
        """A backend over `SimReplica.create(**kwargs)`."""
        return cls(SimReplica.create(**kwargs))

    @property
    def replica(self) -> SimReplica:
        # Created lazily so that a default SimBackend() can be built outside an event loop.
        if self._replica is None:
            self._replica = SimReplica.create()
        return self._replica

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            tool_calls=True,
            prefix_cache=True,
            priority=True,
            pin_ttl=True,
            program_id=True,
            metrics=True,
        )

    def metrics(self) -> EngineMetrics:
        return self.replica.engine.metrics()

    def release_pins(self, program_id: str) -> int:
        return self.replica.engine.release_pins(program_id)

    def _usage(self, done: SimCompletion) -> Usage:
        return Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            cached_prompt_tokens=done.cached_tokens,
        )

    async def generate(self, request: LLMRequest) -> LLMResponse:
        replica = self.replica
        try:
            done = await replica.complete(request)
        except ValueError as exc:
            raise BackendError(str(exc), retryable=False, replica=replica.name) from exc
        except SimulatorFailure as exc:
            raise BackendError(str(exc), retryable=True, replica=replica.name) from exc
        return LLMResponse(
            content=done.content,
            tool_calls=done.tool_calls,
            finish_reason=done.finish_reason,
            usage=self._usage(done),
            model=request.model,
            replica=replica.name,
            ttft_s=done.ttft_s,
        )

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        replica = self.replica
        try:
            async for item in replica.stream(request):
                if isinstance(item, str):
                    yield StreamChunk(delta=item)
                else:
                    yield StreamChunk(
                        tool_calls=item.tool_calls,
                        finish_reason=item.finish_reason,
                        usage=self._usage(item),
                    )
        except ValueError as exc:
            raise BackendError(str(exc), retryable=False, replica=replica.name) from exc
        except SimulatorFailure as exc:
            raise BackendError(str(exc), retryable=True, replica=replica.name) from exc
