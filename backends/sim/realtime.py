"""A simulated replica in real time: answers chat requests with scripted content, paced by
the engine.

`SimReplica` puts an `Engine` on a `RealTimeClock` (in the running asyncio loop) and turns
an `LLMRequest` into a simulated request: the prompt is the chat template's tokens
(`tokenizer.encode_chat`), the answer comes from a `ScriptedBackend` (rules, tool calls,
schema-valid JSON), and its tokens (`tokenizer.encode_completion`) are what the engine
generates — so the output length is the content's, and the next turn of a conversation hits
the cache for this turn's prompt *and* answer. Time to first token, token pacing and
queueing are the engine's.

Several replicas may share one `RealTimeClock` (one process, one loop).

Public API (stable):

    replica = SimReplica.create(profile="h100_sxm_llama31_8b", policy="fcfs", rules=None,
                                speed=1.0, name="sim-0", model=None, clock=None, config=None)
    await replica.complete(request: LLMRequest) -> SimCompletion
    async for item in replica.stream(request): ...   # str deltas, then one SimCompletion
    replica.engine, replica.clock, replica.name, replica.model
    load_rules(path) -> list[ScriptRule]     # a YAML/JSON file of scripted-answer rules

Errors: a request that can never fit (too long for the model or the KV cache, or its
prompt plus `max_tokens` over the context: `ContextLengthExceeded`) raises `ValueError`
before it is queued; if the engine itself fails, every pending request gets
that error (`SimulatorFailure`) and the replica refuses new work.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from treadle.backends.base import LLMRequest, ToolCall
from treadle.backends.scripted import ScriptedBackend, ScriptRule
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import RealTimeClock
from treadle.backends.sim.engine import Engine, EngineConfig, SchedulingPolicy, SimRequest
from treadle.backends.sim.profile import DEFAULT_PROFILE, Profile
from treadle.backends.sim.tokenizer import (
    completion_text_ends,
    encode_chat,
    encode_completion,
)
from treadle.errors import BackendError


def default_model_name(profile: Profile) -> str:
    """The served model name of a replica not given one: `sim-` and the profile's model."""
    return f"sim-{Path(profile.model.name).name}"


class SimulatorFailure(BackendError, RuntimeError):
    """The simulated engine raised; the replica is unusable."""


class DuplicateRequestId(BackendError, ValueError):
    """A request came with the id of a request still in flight (SGLang refuses these)."""


class ContextLengthExceeded(BackendError, ValueError):
    """The prompt plus the requested `max_tokens` exceed the model's context (vLLM: 400)."""


@dataclass
class SimCompletion:
    """A finished simulated chat completion (token counts from the engine)."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    #: wall seconds from arrival to the first token
    ttft_s: float | None
    request: SimRequest = field(repr=False)


@dataclass
class _Answer:
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    output_ids: list[int]
    text_ends: list[int]  # char end of each content token


class SimReplica:
    """One simulated engine replica on a real-time clock (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        content: ScriptedBackend | None = None,
        *,
        model: str | None = None,
    ):
        if not isinstance(engine.clock, RealTimeClock):
            raise TypeError("a SimReplica needs an engine on a RealTimeClock")
        self.engine = engine
        self.clock: RealTimeClock = engine.clock
        self.content = content or ScriptedBackend()
        self.name = engine.name
        self.model = model or default_model_name(engine.profile)
        self._pending: dict[
            SimRequest, tuple[asyncio.Future[SimRequest], asyncio.Event | None]
        ] = {}
        self._failure: BaseException | None = None
        previous = self.clock.on_error

        def on_error(exc: BaseException) -> None:
            self._fail(exc)
            if previous is not None:
                previous(exc)

        self.clock.on_error = on_error

    @classmethod
    def create(
        cls,
        profile: str | Profile = DEFAULT_PROFILE,
        *,
        policy: SchedulingPolicy = "fcfs",
        rules: list[ScriptRule] | None = None,
        speed: float = 1.0,
        name: str = "sim-0",
        model: str | None = None,
        clock: RealTimeClock | None = None,
        config: EngineConfig | None = None,
    ) -> SimReplica:
        prof = profile if isinstance(profile, Profile) else Profile.load(profile)
        cfg = config or EngineConfig(policy=policy)
        engine = Engine(prof, clock or RealTimeClock(speed), cfg, name=name)
        return cls(engine, ScriptedBackend(rules), model=model)

    # -- answering -------------------------------------------------------------------------

    async def _answer(self, request: LLMRequest) -> _Answer:
        scripted = await self.content.generate(request)
        content, calls = scripted.content, list(scripted.tool_calls)
        output_ids = encode_completion(content, calls)
        ends = completion_text_ends(content)
        finish = scripted.finish_reason
        limit = request.max_tokens
        if limit is not None and len(output_ids) > limit:
            if limit < 1:
                raise ValueError("max_tokens must be >= 1")
            # Cut like a real model would: the content's first `limit` tokens, no calls.
            cut = min(limit, len(ends))
            content = (content or "")[: ends[cut - 1]] if cut else ""
            calls = []
            output_ids = output_ids[:limit]
            ends = ends[:cut]
            finish = "length"
        return _Answer(content, calls, finish, output_ids, ends)

    def _submit(
        self,
        request: LLMRequest,
        answer: _Answer,
        wake: asyncio.Event | None = None,
        cache_salt: str | None = None,
    ) -> tuple[SimRequest, asyncio.Future[SimRequest]]:
        if self._failure is not None:
            raise SimulatorFailure(f"replica {self.name} failed: {self._failure}")
        hints = request.hints
        prompt_ids = encode_chat(request.messages, request.tools)
        context = self.engine.profile.model.max_model_len
        if request.max_tokens is not None and len(prompt_ids) + request.max_tokens > context:
            # vLLM refuses it before anything is generated (its wording)
            raise ContextLengthExceeded(
                f"You passed {len(prompt_ids)} input tokens and requested "
                f"{request.max_tokens} output tokens. However, the model's context length is "
                f"only {context} tokens, resulting in a maximum input length of "
                f"{context - request.max_tokens} tokens. Please reduce the length of the "
                "input prompt."
            )
        prompt = Prompt.from_tokens(prompt_ids, self.engine.block_size, cache_salt)
        fut: asyncio.Future[SimRequest] = asyncio.get_running_loop().create_future()

        def done(r: SimRequest) -> None:
            self._pending.pop(r, None)
            if not fut.done():
                fut.set_result(r)
            if wake is not None:
                wake.set()

        request_id = hints.request_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if any(r.request_id == request_id for r in self._pending):
            # as SGLang (and vLLM) do: a request id is a handle on a request in flight
            raise DuplicateRequestId(f"duplicate request id {request_id!r}: one is still running")
        sim = SimRequest(
            prompt,
            output_tokens=answer.output_ids,
            request_id=request_id,
            priority=hints.priority,
            program_id=hints.program_id,
            pin_ttl_s=hints.pin_ttl_s,
            is_last_step=hints.is_last_step,
            on_finish=done,
            on_token=None if wake is None else (lambda r: wake.set()),
        )
        self.engine.submit(sim)  # ValueError if it can never fit
        self._pending[sim] = (fut, wake)
        return sim, fut

    def _completion(self, sim: SimRequest, answer: _Answer) -> SimCompletion:
        ttft = sim.ttft
        return SimCompletion(
            content=answer.content,
            tool_calls=answer.tool_calls,
            finish_reason=answer.finish_reason,
            prompt_tokens=sim.prompt_tokens,
            completion_tokens=sim.output_tokens,
            cached_tokens=sim.cached_tokens or 0,
            ttft_s=None if ttft is None else ttft / self.clock.speed,
            request=sim,
        )

    async def complete(
        self, request: LLMRequest, *, cache_salt: str | None = None
    ) -> SimCompletion:
        """Run `request` through the engine; returns when its last token is generated. Its
        prompt shares cached blocks only with prompts of the same `cache_salt`."""
        answer = await self._answer(request)
        sim, fut = self._submit(request, answer, cache_salt=cache_salt)
        try:
            await fut
        except asyncio.CancelledError:
            self._abort(sim, fut)
            raise
        return self._completion(sim, answer)

    async def stream(
        self, request: LLMRequest, *, cache_salt: str | None = None
    ) -> AsyncGenerator[str | SimCompletion, None]:
        """Yield the content as the engine generates it (text deltas), then the completion."""
        answer = await self._answer(request)
        wake = asyncio.Event()
        sim, fut = self._submit(request, answer, wake, cache_salt)
        text = answer.content or ""
        ends = answer.text_ends
        sent = 0
        try:
            while not fut.done():
                await wake.wait()
                wake.clear()
                if fut.done():
                    break
                tokens = min(self.engine.decoded_tokens(sim), len(ends))
                upto = ends[tokens - 1] if tokens else 0
                if upto > sent:
                    yield text[sent:upto]
                    sent = upto
            fut.result()  # the engine's failure, if any
        finally:
            if not fut.done():
                self._abort(sim, fut)
        if sent < len(text):
            yield text[sent:]
        yield self._completion(sim, answer)

    # -- failure ---------------------------------------------------------------------------

    def _abort(self, sim: SimRequest, fut: asyncio.Future[SimRequest]) -> None:
        self._pending.pop(sim, None)
        fut.cancel()
        if self._failure is None:
            self.engine.abort(sim)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        err = SimulatorFailure(f"replica {self.name} failed: {exc!r}")
        for fut, wake in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
            if wake is not None:
                wake.set()
        self._pending.clear()


def load_rules(path: str | Path) -> list[ScriptRule]:
    """Script rules from a YAML or JSON file: a list of rules, or `{"rules": [...]}`."""
    try:
        data = YAML(typ="safe", pure=True).load(Path(path).read_text())
    except YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of script rules (or {{rules: [...]}})")
    try:
        return [ScriptRule.model_validate(r) for r in data]
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid script rule: {exc}") from exc
