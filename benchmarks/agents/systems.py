"""The four systems of `treadle bench agents`, as frontends of the simulated cluster.

Each is implemented as that system behaves, on the same engines (`backends/sim`), which
differ only in the documented engine switches each system uses:

- `vllm` — request-level FCFS in every engine (`policy="fcfs"`), LRU prefix cache, no pins;
  each call goes to the replica with the fewest outstanding tokens (`least_load`, as in
  `backends/routing.py`), wherever the program's earlier calls ran.
- `continuum` — program-level FCFS in the engine (`policy="program"`: a program holding a
  pin first, then by the program's first arrival); after a call whose answer invokes a tool
  the engine pins the sequence for a fixed 2 s when that tool's running-mean duration is at
  most 2 s (Continuum's `set_up_pin`, `FIXED_THRESHOLD_CONTINUUM = 2.0`; a tool without
  history counts as 0 s); no pin when the answer calls no tool; pins stay until they expire
  or the program's next request runs (`pin_pressure="keep"`); session affinity: a program
  stays on the replica of its first call, which goes to the least-loaded replica.
- `autellix` — program-level least-attained-service (PLAS) through engine priorities
  (`policy="priority"`): a call's priority is its program's level, 0 below one quantum of
  attained service (2 GPU-seconds) and one more per doubling, with Autellix's
  anti-starvation (a program whose calls waited more than `starvation_ratio` times its
  attained service is raised to level 0); calls with short prompts (< 2,048 tokens) go to
  the least-loaded replica, long ones stick to the program's previous replica. No pins.
- `treadle` — `treadle.runtime.sched.scheduler.Scheduler` holds every call (run-level admission
  against each replica's KV working set, tenant fair share, PLAS, critical path, AIMD
  in-flight limits per replica whose congestion signal is memory — preemption, or
  requests waiting while KV is full — and work stealing) and passes the program's level
  as the engine priority (`policy="priority"`); `treadle.runtime.sched.pinning` decides
  quantile-TTL pins by cost and benefit, only where the DAG says the conversation goes on
  after the tool (a tool loop inside one `llm` node, not a step graph's next node), and
  they are released when the next call runs, when the program ends, and (engine
  `pin_pressure="release"`) when memory runs short.

A pin decision needs the tool the call's answer invokes. A real server (Continuum) or the
runtime (treadle) learns it from the answer when the call finishes; the simulator takes the
request's TTL when the call is sent, so both systems decide then, from the tool the
workload says the answer invokes and the state at that moment. "Service" (for PLAS and
fair share) is GPU token-time: prefill time of the uncached prompt plus each output
token's share of a decode step at a reference batch of 16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from treadle.backends.dispatch.routing import (
    LeastLoadPolicy,
    ReplicaState,
    RequestFeatures,
    Router,
    Ticket,
)
from treadle.backends.sim import EngineConfig, Profile, SimRequest
from treadle.benchmarks.agents.sim import CallRun, ProgramRun, Simulation
from treadle.runtime.sched.limits import LimitConfig
from treadle.runtime.sched.pinning import PinPolicy, PinRequest, ToolDurations
from treadle.runtime.sched.scheduler import Call, Lane, Program, Scheduler, SchedulerConfig

#: max_tokens a client sends with an agent call (what a router counts as pending decode)
MAX_TOKENS = 512
#: Continuum's fixed pin TTL and the tool-duration threshold it applies to
CONTINUUM_TTL_S = 2.0
#: Autellix: prompts at least this long stick to the program's replica
AUTELLIX_LONG_TOKENS = 2048
#: PLAS quantum (GPU seconds of attained service that end level 0), for autellix and treadle
LAS_QUANTUM_S = 2.0
SYSTEMS = ("vllm", "continuum", "autellix", "treadle")
#: KV usage at which a waiting request means memory, not the token budget, holds it back
MEMORY_FULL = 0.95


class ServiceModel:
    """GPU token-time of a call: prefill of its uncached prompt plus its output tokens'
    share of decode steps at a reference batch."""

    def __init__(self, profile: Profile, ref_batch: int = 16):
        self.profile = profile
        self.ref_batch = ref_batch

    def prefill_s(self, prompt: int, cached: int = 0) -> float:
        cached = max(0, min(cached, prompt - 1))
        return self.profile.prefill_time(prompt, cached) if prompt > 0 else 0.0

    def decode_s(self, context: int, output: int) -> float:
        b = self.ref_batch
        mid = context + output // 2
        return output * self.profile.decode_step_time(b, mid) / b

    def service_s(self, prompt: int, cached: int, output: int) -> float:
        return self.prefill_s(prompt, cached) + self.decode_s(prompt, output)


def _features(call: CallRun, now: float) -> RequestFeatures:
    assert call.prompt is not None
    return RequestFeatures(
        chunks=(),
        prompt_tokens=call.prompt.num_tokens,
        output_tokens=MAX_TOKENS,
        program_id=call.prog.program_id,
        now=now,
    )


class _Base:
    """Shared plumbing: a `Router` tracking each replica's outstanding tokens."""

    name = "base"

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
        ticket = self.router.route(_features(call, self.now))
        call.handle = ticket
        return ticket

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


class VLLMSystem(_Base):
    name = "vllm"

    def submit(self, call: CallRun) -> None:
        assert self.sim is not None
        ticket = self.route(call)
        self.sim.send(call, ticket.replica)


class _AffinityPolicy(LeastLoadPolicy):
    """Session affinity: a program's first call goes to the least-loaded replica, the rest
    follow it (Continuum's deployment)."""

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


class ContinuumSystem(_Base):
    name = "continuum"

    def __init__(self) -> None:
        super().__init__()
        # Continuum's estimator: running mean of each tool's observed duration
        self._tool_total: dict[str, float] = {}
        self._tool_calls: dict[str, int] = {}
        self.pins_requested = 0

    def engine_config(self) -> EngineConfig:
        return EngineConfig(policy="program", pin_pressure="keep")

    def policy(self, n: int) -> Any:
        self.affinity = _AffinityPolicy()
        return self.affinity

    def running_mean(self, tool: str) -> float:
        n = self._tool_calls.get(tool, 0)
        return self._tool_total[tool] / n if n else 0.0

    def submit(self, call: CallRun) -> None:
        assert self.sim is not None
        ticket = self.route(call)
        tool = call.spec.tool
        ttl = None
        if tool is not None and self.running_mean(tool) <= CONTINUUM_TTL_S:
            ttl = CONTINUUM_TTL_S
            self.pins_requested += 1
        self.sim.send(call, ticket.replica, pin_ttl_s=ttl, is_last_step=tool is None)

    def tool_done(self, call: CallRun, tool: str, duration_s: float) -> None:
        self._tool_total[tool] = self._tool_total.get(tool, 0.0) + duration_s
        self._tool_calls[tool] = self._tool_calls.get(tool, 0) + 1

    def program_done(self, prog: ProgramRun) -> None:
        self.affinity.home.pop(prog.program_id, None)

    def stats(self) -> dict[str, Any]:
        return {"pins_requested": self.pins_requested}


class _StickyLongPolicy(LeastLoadPolicy):
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


class AutellixSystem(_Base):
    name = "autellix"

    def __init__(self, *, quantum_s: float = LAS_QUANTUM_S, starvation_ratio: float = 4.0):
        super().__init__()
        self.quantum_s = quantum_s
        self.starvation_ratio = starvation_ratio
        self.attained: dict[str, float] = {}
        self.waited: dict[str, float] = {}
        self.promotions = 0

    def engine_config(self) -> EngineConfig:
        return EngineConfig(policy="priority")

    def attach(self, sim: Simulation) -> None:
        super().attach(sim)
        self.model = ServiceModel(sim.profile)

    def policy(self, n: int) -> Any:
        self.balancer = _StickyLongPolicy()
        return self.balancer

    def level(self, pid: str) -> int:
        a = self.attained.get(pid, 0.0)
        if self.waited.get(pid, 0.0) > self.starvation_ratio * max(a, self.quantum_s):
            self.promotions += 1
            self.waited[pid] = 0.0
            return 0
        if a < self.quantum_s:
            return 0
        level = 1
        q = 2 * self.quantum_s
        while a >= q and level < 15:
            level += 1
            q *= 2
        return level

    def submit(self, call: CallRun) -> None:
        assert self.sim is not None
        ticket = self.route(call)
        self.sim.send(call, ticket.replica, priority=self.level(call.prog.program_id))

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        super().on_finish(call, req)
        pid = call.prog.program_id
        cached = req.cached_tokens or 0
        service = self.model.service_s(req.prompt_tokens, cached, req.output_tokens)
        self.attained[pid] = self.attained.get(pid, 0.0) + service
        if req.ttft is not None:
            alone = self.model.prefill_s(req.prompt_tokens, cached)
            self.waited[pid] = self.waited.get(pid, 0.0) + max(0.0, req.ttft - alone)

    def program_done(self, prog: ProgramRun) -> None:
        pid = prog.program_id
        self.attained.pop(pid, None)
        self.waited.pop(pid, None)
        self.balancer.last.pop(pid, None)

    def stats(self) -> dict[str, Any]:
        return {"starvation_promotions": self.promotions}


class TreadleSystem(_Base):
    """treadle's scheduler and pinning policy in front of the engines."""

    name = "treadle"

    def __init__(
        self,
        *,
        config: SchedulerConfig | None = None,
        working_set_fraction: float = 0.9,
    ) -> None:
        super().__init__()
        self.config = config or SchedulerConfig(
            las_quantum_s=LAS_QUANTUM_S,
            limits=LimitConfig(initial=64, minimum=4, maximum=256),
        )
        self.working_set_fraction = working_set_fraction
        self.pins_requested = 0
        self.pins_declined = 0

    def engine_config(self) -> EngineConfig:
        return EngineConfig(policy="priority", pin_pressure="release")

    def attach(self, sim: Simulation) -> None:
        self.sim = sim
        self.model = ServiceModel(sim.profile)
        self.capacity = [e.cache.total * e.block_size for e in sim.engines]
        self.sched = Scheduler(
            [e.name for e in sim.engines],
            self.config,
            place=self._place,
            can_carry=self._can_carry,
            can_steal=self._can_steal,
        )
        for tenant, weight in sim.workload.tenants.items():
            self.sched.set_weight(tenant, weight)
        self.durations = ToolDurations()
        for name, declared in sim.workload.declared_durations.items():
            self.durations.declare(name, declared)
        self.pin_policy = PinPolicy(self.durations)
        #: per replica: KV tokens of the contexts of the programs homed there
        self.working_set = [0] * len(sim.engines)
        self._outputs: dict[str, tuple[int, int]] = {}

    # -- admission and placement ---------------------------------------------------------

    def _ctx(self, p: Program) -> int:
        return int(p.info.get("ctx", 0))

    def _place(self, p: Program, lanes: Sequence[Lane]) -> int:
        need = self._ctx(p)
        cap = self.capacity

        def key(ln: Lane) -> tuple[float, float, int]:
            fill = (self.working_set[ln.index] + need) / cap[ln.index]
            load = (ln.in_flight + ln.queued) / max(ln.limit.value, 1e-9)
            return (load + fill, ln.tenant_homed.get(p.tenant.name, 0), ln.index)

        lane = min(lanes, key=key).index
        self.working_set[lane] += need
        p.info["ws_lane"] = lane
        return lane

    def _can_carry(self, p: Program) -> bool:
        need = self._ctx(p)
        frac = self.working_set_fraction
        return any(
            self.working_set[i] + need <= frac * self.capacity[i] for i in range(len(self.capacity))
        )

    def _can_steal(self, call: Call, src: Lane, dst: Lane, now: float) -> bool:
        waited = now - call.enqueued_at
        if waited < self.config.steal_after_s:
            return False
        run: CallRun = call.payload
        assert self.sim is not None and run.prompt is not None
        hit = self.sim.engines[dst.index].probe(run.prompt)
        # worth it when it has already waited longer than rebuilding its context there
        return waited >= self.model.prefill_s(run.prompt.num_tokens, hit)

    def _grow(self, p: Program, tokens: int) -> None:
        lane = p.info.get("ws_lane")
        old = self._ctx(p)
        p.info["ctx"] = tokens
        if lane is not None:
            self.working_set[lane] += tokens - old

    def _move(self, p: Program, lane: int) -> None:
        old = p.info.get("ws_lane")
        if old == lane:
            return
        ctx = self._ctx(p)
        if old is not None:
            self.working_set[old] -= ctx
        self.working_set[lane] += ctx
        p.info["ws_lane"] = lane

    # -- the call path -------------------------------------------------------------------

    def program_arrived(self, prog: ProgramRun) -> None:
        first = prog.spec.calls[0]
        self.sched.open_program(
            prog.program_id,
            prog.tenant,
            self.now,
            info={"ctx": first.prompt_tokens + MAX_TOKENS // 2},
        )
        self._pump()

    def _expected_output(self, pid: str) -> int:
        n, total = self._outputs.get(pid, (0, 0))
        return total // n if n else 200

    def submit(self, call: CallRun) -> None:
        assert call.prompt is not None
        pid = call.prog.program_id
        p = self.sched.programs.get(pid)
        out = self._expected_output(pid)
        lane = p.home if p is not None else None
        cached = self.sim.engines[lane].probe(call.prompt) if lane is not None and self.sim else 0
        c = Call(
            call.call_id,
            pid,
            est_service_s=self.model.service_s(call.prompt.num_tokens, cached, out),
            remaining_cost_s=call.spec.remaining_cost_s,
            payload=call,
        )
        call.handle = c
        self.sched.submit(c, self.now, tenant=call.prog.tenant)
        self._pump()

    def _pump(self) -> None:
        for c in self.sched.dispatch(self.now):
            self._send(c)

    def pressure(self, replica: int) -> float:
        assert self.sim is not None
        e = self.sim.engines[replica]
        if e.num_waiting:
            return 1.0
        return e.kv_usage

    def _send(self, c: Call) -> None:
        assert self.sim is not None
        run: CallRun = c.payload
        assert run.prompt is not None and c.assigned is not None
        p = self.sched.programs.get(c.program_id)
        if p is not None and c.stolen:
            self._move(p, c.assigned)
        spec = run.spec
        ttl = None
        # a pin only helps when the next call continues this conversation (the DAG says
        # so: a tool loop inside one llm node, not the next node's fresh prompt)
        if spec.tool is not None and spec.continues and not spec.is_last_step:
            tokens = run.prompt.num_tokens + self._expected_output(c.program_id)
            decision = self.pin_policy.decide(
                PinRequest(
                    tokens=tokens,
                    prefill_s=self.model.prefill_s(tokens),
                    capacity_tokens=self.capacity[c.assigned],
                    pressure=self.pressure(c.assigned),
                    tool=spec.tool,
                    is_last_step=spec.is_last_step,
                )
            )
            if decision.pin:
                ttl = decision.ttl_s
                self.pins_requested += 1
            else:
                self.pins_declined += 1
        self.sim.send(
            run,
            c.assigned,
            priority=c.priority,
            pin_ttl_s=ttl,
            is_last_step=spec.tool is None or spec.is_last_step,
        )

    def on_first_token(self, call: CallRun, req: SimRequest) -> None:
        return None

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        assert self.sim is not None
        pid = call.prog.program_id
        n, total = self._outputs.get(pid, (0, 0))
        self._outputs[pid] = (n + 1, total + req.output_tokens)
        cached = req.cached_tokens or 0
        # congestion: the batch is full: it was preempted, or requests wait in the engine
        # because memory ran out (waiting for the token budget is not: chunked prefill
        # works through it at full speed, in the priority order the scheduler gave)
        engine = self.sim.engines[call.replica or 0]
        congested = req.num_preemptions > 0 or (
            engine.num_waiting > 0 and engine.kv_usage >= MEMORY_FULL
        )
        self.sched.complete(
            call.handle,
            self.now,
            service_s=self.model.service_s(req.prompt_tokens, cached, req.output_tokens),
            congested=congested,
        )
        p = self.sched.programs.get(pid)
        if p is not None and call.sequence is not None:
            self._grow(p, call.sequence.num_tokens)
        self._pump()

    def tool_done(self, call: CallRun, tool: str, duration_s: float) -> None:
        self.durations.observe(tool, duration_s)

    def program_done(self, prog: ProgramRun) -> None:
        assert self.sim is not None
        pid = prog.program_id
        p = self.sched.programs.get(pid)
        if p is not None:
            lane = p.info.get("ws_lane")
            if lane is not None:
                self.working_set[lane] -= self._ctx(p)
        # the run ended: nothing of it is worth holding any more
        for engine in self.sim.engines:
            engine.release_pins(pid)
        self._outputs.pop(pid, None)
        self.sched.close_program(pid, self.now)
        self._pump()

    def stats(self) -> dict[str, Any]:
        s = self.sched
        return {
            "pins_requested": self.pins_requested,
            "pins_declined": self.pins_declined,
            "steals": s.steals,
            "starvation_promotions": s.starvation_promotions,
            "limits": [round(v, 1) for v in s.limits()],
        }


FACTORIES: dict[str, Callable[[], Any]] = {
    "vllm": VLLMSystem,
    "continuum": ContinuumSystem,
    "autellix": AutellixSystem,
    "treadle": TreadleSystem,
}


def make_system(name: str) -> Any:
    try:
        return FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}") from None
