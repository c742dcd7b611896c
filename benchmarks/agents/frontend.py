"""What every system of `treadle bench agents` shares: a router's view of the replicas and
the session-affine routing policy; `ServiceModel` (GPU token-time, from `sim.py`) is
re-exported for the systems that count attained service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treadle.backends.dispatch.routing import (
    LeastLoadPolicy,
    ReplicaState,
    RequestFeatures,
    Router,
    Ticket,
)
from treadle.backends.sim import EngineConfig, SimRequest
from treadle.benchmarks.agents.sim import CallRun, ProgramRun, ServiceModel, Simulation

__all__ = ["MAX_TOKENS", "AffinityPolicy", "Frontend", "ServiceModel", "features"]

#: max_tokens a client sends with an agent call (what a router counts as pending decode)
MAX_TOKENS = 512


def features(call: CallRun, now: float) -> RequestFeatures:
    assert call.prompt is not None
    return RequestFeatures(
        chunks=(),
        prompt_tokens=call.prompt.num_tokens,
        output_tokens=MAX_TOKENS,
        program_id=call.prog.program_id,
        now=now,
    )


class AffinityPolicy(LeastLoadPolicy):
    """Session affinity: a program's first call goes to the replica with the fewest
    outstanding tokens, the rest follow it (vLLM production-stack's session routing, made
    load-aware at the session's start)."""

    name = "affinity"

    def __init__(self) -> None:
        super().__init__()
        self.home: dict[str, int] = {}

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int:
        pid = request.program_id
        if pid is not None and pid in self.home:
            return self.home[pid]
        idx = super().choose(request, replicas)
        if pid is not None:
            self.home[pid] = idx
        return idx

    def forget(self, program_id: str) -> None:
        self.home.pop(program_id, None)


class Frontend:
    """A system in front of the engines (the `sim.Frontend` protocol), with a `Router`
    tracking each replica's outstanding tokens. Subclasses choose the engine switches,
    the routing policy and what happens around each call."""

    name = "base"
    #: the engines get unlimited KV (the `bound` system)
    unlimited_kv = False

    def __init__(self) -> None:
        self.sim: Simulation | None = None
        self.router: Router | None = None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(policy="fcfs")

    def attach(self, sim: Simulation) -> None:
        self.sim = sim
        self.router = Router(self.policy(len(sim.engines)), [e.name for e in sim.engines])

    def policy(self, n: int) -> Any:
        return LeastLoadPolicy()

    @property
    def now(self) -> float:
        assert self.sim is not None
        return self.sim.clock.now()

    def program_arrived(self, prog: ProgramRun) -> None:
        return None

    def route(self, call: CallRun) -> Ticket:
        assert self.router is not None
        ticket = self.router.route(features(call, self.now))
        call.handle = ticket
        return ticket

    def submit(self, call: CallRun) -> None:
        assert self.sim is not None
        self.sim.send(call, self.route(call).replica)

    def on_first_token(self, call: CallRun, req: SimRequest) -> None:
        if isinstance(call.handle, Ticket) and self.router is not None:
            self.router.prefill_done(call.handle)

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        if isinstance(call.handle, Ticket) and self.router is not None:
            self.router.finish(call.handle, now=self.now, cached_tokens=req.cached_tokens)

    def tool_done(self, call: CallRun, tool: str, duration_s: float) -> None:
        return None

    def program_done(self, prog: ProgramRun) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {}
