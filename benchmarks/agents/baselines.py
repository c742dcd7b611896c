"""The baselines of `treadle bench agents`, each as its own system behaves at its best, on
the same simulated engines (which differ only in the documented engine switches).

- `vllm` — the fair baseline: vLLM with request-level FCFS (`policy="fcfs"`), automatic
  prefix caching (always on in the simulator), no pins, and session-affine routing: a
  program's first call goes to the replica with the fewest outstanding tokens and the
  rest follow it, so its context stays where it was computed.
- `vllm-least-load` — the same engines, every call to the replica with the fewest
  outstanding tokens wherever the program ran before (per-call load balancing).
- `vllm-rr` — the same engines, calls round-robin over the replicas.
- `bound` — the same engines as `vllm` with unlimited KV memory and session affinity:
  no eviction, no preemption, every prefix stays cached. It is the limit that KV capacity
  puts on FCFS serving: what a scheduler could get if memory did not bind.
- `continuum` — vllm-continuum (Hanchenli/vllm-continuum, as released; docs/benchmarks.md
  cites the files): job-level FCFS with pinned jobs first (`policy="program"`); when a
  request finishes and the tool its answer calls has a running-mean execution time of at
  most 2 s (`FIXED_THRESHOLD_CONTINUUM`; a tool never seen counts as 0 s) the request's
  KV is pinned for 2 s; the execution time is measured as the gap from the request's
  finish to its job's next request; no pin when the answer calls no tool or the request
  is the job's last step. A pin is released when the job's next request finishes
  (`pin_release="finished"`), at its deadline only once no request of the job waits, and
  under memory pressure only as a last resort, latest deadline first
  (`pin_pressure="last_resort"`); no cap on pinned memory; preemption takes the running
  request of the latest job, one that is not a last step first. Session affinity as
  `vllm` (Continuum's multi-replica deployment).
- `autellix` — Autellix (Luo et al., 2025): program-level least-attained-service (PLAS)
  through engine priorities (`policy="priority"`): a call's priority is its program's
  level, 0 below one quantum of attained service (2 GPU-seconds) and one more per
  doubling; for programs with parallel calls, attained service is counted along the
  critical path (ATLAS: a call inherits the largest attained service among the calls it
  depends on, plus theirs). Anti-starvation: a program whose calls have waited more than
  `starvation_ratio` times its attained service goes to level 0. Its load balancer sends
  calls with short prompts (< 2,048 tokens) to the least-loaded replica and long ones to
  the replica that served the program before. No pins.

A pin decision needs the tool the call's answer invokes. A real server (Continuum) learns
it from the answer when the call finishes; the simulator takes the request's TTL when the
call is sent, so the decision is made then, from the tool the workload says the answer
invokes and the estimates at that moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treadle.backends.dispatch.routing import (
    LeastLoadPolicy,
    ReplicaState,
    RequestFeatures,
    RoundRobinPolicy,
)
from treadle.backends.sim import EngineConfig, SimRequest
from treadle.benchmarks.agents.frontend import AffinityPolicy, Frontend, ServiceModel
from treadle.benchmarks.agents.sim import CallRun, ProgramRun, Simulation

#: vllm-continuum's fixed pin TTL and the tool-duration threshold it applies to
CONTINUUM_TTL_S = 2.0
#: Autellix: prompts at least this long stick to the program's replica
AUTELLIX_LONG_TOKENS = 2048
#: PLAS quantum (GPU seconds of attained service that end level 0), for autellix and treadle
LAS_QUANTUM_S = 2.0


class VLLMSystem(Frontend):
    name = "vllm"

    def policy(self, n: int) -> Any:
        self.affinity = AffinityPolicy()
        return self.affinity

    def program_done(self, prog: ProgramRun) -> None:
        self.affinity.forget(prog.program_id)


class VLLMLeastLoadSystem(Frontend):
    name = "vllm-least-load"


class VLLMRoundRobinSystem(Frontend):
    name = "vllm-rr"

    def policy(self, n: int) -> Any:
        return RoundRobinPolicy()


class BoundSystem(VLLMSystem):
    name = "bound"
    unlimited_kv = True


class ContinuumSystem(VLLMSystem):
    name = "continuum"

    def __init__(self) -> None:
        super().__init__()
        # ToolCallEstimator: running mean of each tool's observed execution time
        self._exec_total: dict[str, float] = {}
        self._exec_count: dict[str, int] = {}
        #: per program: (finish time, tool) of its latest request
        self._departed: dict[str, tuple[float, str | None]] = {}
        self.pins_requested = 0

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            policy="program",
            pin_release="finished",
            pin_pressure="last_resort",
            max_pinned_fraction=1.0,
        )

    def running_mean(self, tool: str) -> float:
        n = self._exec_count.get(tool, 0)
        return self._exec_total[tool] / n if n else 0.0

    def submit(self, call: CallRun) -> None:
        assert self.sim is not None
        pid = call.prog.program_id
        last = self._departed.pop(pid, None)
        if last is not None and last[1] is not None:
            # update_func_call_exec_time: from the job's last departure to this arrival
            ran = last[1]
            self._exec_total[ran] = self._exec_total.get(ran, 0.0) + self.now - last[0]
            self._exec_count[ran] = self._exec_count.get(ran, 0) + 1
        ticket = self.route(call)
        tool = call.spec.tool
        last_step = tool is None and not call.prog.dependents[call.spec.index]
        ttl = None
        if tool is not None and not last_step and self.running_mean(tool) <= CONTINUUM_TTL_S:
            ttl = CONTINUUM_TTL_S
            self.pins_requested += 1
        self.sim.send(call, ticket.replica, pin_ttl_s=ttl, is_last_step=last_step)

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        super().on_finish(call, req)
        self._departed[call.prog.program_id] = (self.now, call.spec.tool)

    def program_done(self, prog: ProgramRun) -> None:
        super().program_done(prog)
        self._departed.pop(prog.program_id, None)

    def stats(self) -> dict[str, Any]:
        return {"pins_requested": self.pins_requested}


class StickyLongPolicy(LeastLoadPolicy):
    """Autellix's load balancer: short calls to the least-loaded replica, long ones to the
    replica that served the program before (its cache is there)."""

    name = "autellix"

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, int] = {}

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int:
        pid = request.program_id
        if pid is not None and request.prompt_tokens >= AUTELLIX_LONG_TOKENS and pid in self.last:
            idx = self.last[pid]
        else:
            idx = super().choose(request, replicas)
        if pid is not None:
            self.last[pid] = idx
        return idx


class AutellixSystem(Frontend):
    name = "autellix"

    def __init__(self, *, quantum_s: float = LAS_QUANTUM_S, starvation_ratio: float = 4.0):
        super().__init__()
        self.quantum_s = quantum_s
        self.starvation_ratio = starvation_ratio
        #: per program: attained service along the critical path to each finished call
        self.path: dict[str, dict[int, float]] = {}
        self.waited: dict[str, float] = {}
        self.attained: dict[str, float] = {}
        self.promotions = 0

    def engine_config(self) -> EngineConfig:
        return EngineConfig(policy="priority")

    def attach(self, sim: Simulation) -> None:
        super().attach(sim)
        self.model = ServiceModel(sim.profile)

    def policy(self, n: int) -> Any:
        self.balancer = StickyLongPolicy()
        return self.balancer

    def level(self, pid: str, attained: float) -> int:
        if self.waited.get(pid, 0.0) > self.starvation_ratio * max(
            self.attained.get(pid, 0.0), self.quantum_s
        ):
            self.promotions += 1
            self.waited[pid] = 0.0
            return 0
        if attained < self.quantum_s:
            return 0
        level = 1
        q = 2 * self.quantum_s
        while attained >= q and level < 15:
            level += 1
            q *= 2
        return level

    def submit(self, call: CallRun) -> None:
        assert self.sim is not None
        pid = call.prog.program_id
        path = self.path.get(pid, {})
        # ATLAS: the largest attained service along the paths into this call (PLAS for a
        # chain, whose one path is all of the program's service)
        attained = max((path.get(d, 0.0) for d in call.spec.deps), default=0.0)
        ticket = self.route(call)
        self.sim.send(call, ticket.replica, priority=self.level(pid, attained))

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        super().on_finish(call, req)
        pid = call.prog.program_id
        service = self.model.of(req)
        path = self.path.setdefault(pid, {})
        before = max((path.get(d, 0.0) for d in call.spec.deps), default=0.0)
        path[call.spec.index] = before + service
        self.attained[pid] = self.attained.get(pid, 0.0) + service
        if req.ttft is not None:
            alone = self.model.prefill_s(req.prompt_tokens, req.cached_tokens or 0)
            self.waited[pid] = self.waited.get(pid, 0.0) + max(0.0, req.ttft - alone)

    def program_done(self, prog: ProgramRun) -> None:
        pid = prog.program_id
        self.path.pop(pid, None)
        self.attained.pop(pid, None)
        self.waited.pop(pid, None)
        self.balancer.last.pop(pid, None)

    def stats(self) -> dict[str, Any]:
        return {"starvation_promotions": self.promotions}
