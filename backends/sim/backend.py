"""`SimBackend`: a treadle `Backend` that runs requests through a simulated engine in-process.

Content comes from a `ScriptedBackend` (rules, tool calls, schema-valid JSON); timing, token
counts, prefix-cache hits, queueing and pins come from the engine running in real time
(see `realtime.py`). Use it to exercise treadle's scheduling hints end to end without a GPU
or an HTTP hop; `treadle sim serve` offers the same replica over HTTP.

Public API (stable):

    backend = SimBackend()                                   # default profile, fcfs
    backend = SimBackend(policy="program", rules=[...], script="rules.yaml", speed=10.0)
    backend = SimBackend(SimReplica.create(...))             # a replica you built
    backend = SimBackend.create(**SimReplica.create kwargs)
    backend.capabilities      # streaming, tool_calls, prefix_cache, priority, pin_ttl,
                              # program_id, metrics
    await backend.generate(request) -> LLMResponse       # usage.cached_prompt_tokens, ttft_s
    async for chunk in backend.stream(request): ...      # StreamChunk
    backend.metrics() -> EngineMetrics
    backend.release_pins(program_id) -> int
    backend.name, backend.replica

Hints: `priority` (lower first, under the `priority` policy), `program_id`, `request_id`,
`pin_ttl_s`, `is_last_step` map one to one onto `SimRequest`. A request that can never fit
the replica raises `BackendError(retryable=False)`; an engine failure raises
`BackendError(retryable=True)` (another replica may serve it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from treadle.backends.base import (
    BackendError,
    BackendTarget,
    Capabilities,
    LLMRequest,
    LLMResponse,
    StreamChunk,
    Usage,
)
from treadle.backends.openai_compat.dialects import SIM_CAPABILITIES
from treadle.backends.scripted import ScriptRule
from treadle.backends.sim.engine import EngineConfig, EngineMetrics, PinPressure, SchedulingPolicy
from treadle.backends.sim.profile import DEFAULT_PROFILE, Profile
from treadle.backends.sim.realtime import (
    SimCompletion,
    SimReplica,
    SimulatorFailure,
    default_model_name,
    load_rules,
)


class SimBackend:
    """A `Backend` over one simulated replica (module docstring).

    Either pass a `replica`, or the options to build one (as a workflow file's
    `{backend: sim, ...}` entry does): `profile`, `policy`, `rules` (ScriptRule objects or
    dicts), `script` (a YAML/JSON rules file), `speed`, `name`, `model`, `pin_pressure`,
    `max_pinned_fraction`, `kv_capacity_blocks`. The replica is built on first use, so a
    backend can be configured outside an event loop.
    """

    def __init__(
        self,
        replica: SimReplica | None = None,
        *,
        profile: str = DEFAULT_PROFILE,
        policy: SchedulingPolicy = "fcfs",
        rules: Sequence[ScriptRule | Mapping[str, Any]] | None = None,
        script: str | Path | None = None,
        speed: float = 1.0,
        name: str = "sim-0",
        model: str | None = None,
        pin_pressure: PinPressure = "keep",
        max_pinned_fraction: float = 0.5,
        kv_capacity_blocks: int | None = None,
    ):
        self._replica = replica
        if replica is not None:
            return
        # Validate now, so that a bad option fails where it is configured.
        self._profile = Profile.load(profile)
        self._config = EngineConfig(
            policy=policy,
            pin_pressure=pin_pressure,
            max_pinned_fraction=max_pinned_fraction,
            kv_capacity_blocks=kv_capacity_blocks,
        )
        self._rules = [ScriptRule.model_validate(r) for r in rules or []]
        if script is not None:
            self._rules += load_rules(script)
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._speed = speed
        self._name = name
        self._model = model

    @classmethod
    def create(cls, **kwargs: Any) -> SimBackend:
        """A backend over `SimReplica.create(**kwargs)`."""
        return cls(SimReplica.create(**kwargs))

    @property
    def name(self) -> str:
        return self._replica.name if self._replica is not None else self._name

    @property
    def replica(self) -> SimReplica:
        if self._replica is None:
            self._replica = SimReplica.create(
                self._profile,
                rules=self._rules,
                speed=self._speed,
                name=self._name,
                model=self._model,
                config=self._config,
            )
        return self._replica

    @property
    def capabilities(self) -> Capabilities:
        return SIM_CAPABILITIES

    @property
    def target(self) -> BackendTarget:
        if self._replica is not None:
            model = self._replica.model
        else:
            model = self._model or default_model_name(self._profile)
        return BackendTarget(provider="treadle.sim", model=model)

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
            done = await replica.complete(request, cache_salt=_salt(request))
        except ValueError as exc:
            raise BackendError(str(exc), retryable=False, replica=replica.name) from exc
        except SimulatorFailure as exc:
            raise BackendError(str(exc), retryable=True, replica=replica.name) from exc
        return LLMResponse(
            content=done.content,
            tool_calls=done.tool_calls,
            finish_reason=done.finish_reason,
            usage=self._usage(done),
            model=replica.model,
            id=done.request.request_id,
            replica=replica.name,
            ttft_s=done.ttft_s,
        )

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        replica = self.replica
        try:
            async for item in replica.stream(request, cache_salt=_salt(request)):
                if isinstance(item, str):
                    yield StreamChunk(delta=item)
                else:
                    yield StreamChunk(
                        tool_calls=item.tool_calls,
                        finish_reason=item.finish_reason,
                        usage=self._usage(item),
                        model=replica.model,
                        id=item.request.request_id,
                    )
        except ValueError as exc:
            raise BackendError(str(exc), retryable=False, replica=replica.name) from exc
        except SimulatorFailure as exc:
            raise BackendError(str(exc), retryable=True, replica=replica.name) from exc


def _salt(request: LLMRequest) -> str | None:
    """Each tenant's prompts get a prefix cache of their own: its cached-token counts (and
    timings) then tell nothing of what another tenant asked. The replica is in this process,
    so the tenant's id is salt enough (a server needs a secret one: `cache_salt_secret`)."""
    return request.hints.tenant
