"""The simulated cluster that `treadle bench agents` runs every system on, and its metrics.

`Simulation` replays a `Workload` at one arrival rate on N engine replicas
(`treadle.backends.sim.Engine`) that share one `VirtualClock`. It drives the programs: a
call becomes ready when the calls (and tools) it depends on are done, its prompt is built
from the sequence of the call it continues, it goes to the system's `Frontend`, which
decides when and where it runs and with which hints; when it finishes, its tool runs for
its duration, then the calls that depend on it become ready. A program completes when all
its calls and tools have.

`ideal_times` gives each program's physical limit: its own LLM and tool time alone on an
empty replica with a perfect prefix cache (every prefix its earlier calls produced, and
every shared system prompt, is cached), along its critical path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from treadle.backends.sim import Engine, EngineConfig, Profile, Prompt, SimRequest, VirtualClock
from treadle.backends.sim.profile import sum_max_linear
from treadle.benchmarks.agents.workloads import CallSpec, ProgramSpec, Workload
from treadle.benchmarks.common import mean


@dataclass(eq=False, slots=True)
class CallRun:
    """One call of one program in a simulation."""

    prog: ProgramRun
    spec: CallSpec
    deps_left: int
    prompt: Prompt | None = None
    ready_at: float = math.nan
    request: SimRequest | None = None
    replica: int | None = None
    sequence: Prompt | None = None
    #: frontend data (a routing ticket, a scheduler call)
    handle: Any = None

    @property
    def call_id(self) -> str:
        return f"{self.prog.spec.pid}:{self.spec.index}"


@dataclass(eq=False, slots=True)
class ProgramRun:
    spec: ProgramSpec
    arrival: float
    calls: list[CallRun] = field(default_factory=list)
    open_calls: int = 0
    #: calls that wait for each call
    dependents: dict[int, list[int]] = field(default_factory=dict)
    finished_at: float | None = None

    @property
    def program_id(self) -> str:
        return str(self.spec.pid)

    @property
    def tenant(self) -> str:
        return self.spec.tenant


#: "unlimited" KV for the `bound` system: more blocks than any run here can fill
UNLIMITED_KV_BLOCKS = 1 << 30


class Frontend(Protocol):
    """A system: how it configures its engines and where and when it sends each call."""

    name: str

    def engine_config(self) -> EngineConfig: ...

    def attach(self, sim: Simulation) -> None: ...

    def program_arrived(self, prog: ProgramRun) -> None: ...

    def submit(self, call: CallRun) -> None: ...

    def on_first_token(self, call: CallRun, req: SimRequest) -> None: ...

    def on_finish(self, call: CallRun, req: SimRequest) -> None: ...

    def tool_done(self, call: CallRun, tool: str, duration_s: float) -> None: ...

    def program_done(self, prog: ProgramRun) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Simulation:
    """One system at one arrival rate (module docstring)."""

    def __init__(
        self,
        workload: Workload,
        frontend: Frontend,
        *,
        rate_per_s: float,
        replicas: int = 4,
        profile: Profile | None = None,
        kv_capacity_tokens: int | None = None,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.workload = workload
        self.profile = profile or Profile.default()
        self.clock = VirtualClock()
        self.rate = rate_per_s
        self.frontend = frontend
        cfg = frontend.engine_config()
        if getattr(frontend, "unlimited_kv", False):
            cfg = dataclasses.replace(cfg, kv_capacity_blocks=UNLIMITED_KV_BLOCKS)
        elif kv_capacity_tokens is not None:
            blocks = max(1, kv_capacity_tokens // self.profile.engine.block_size)
            cfg = dataclasses.replace(cfg, kv_capacity_blocks=blocks)
        self.engines = [
            Engine(self.profile, self.clock, cfg, name=f"r{i}") for i in range(replicas)
        ]
        self.programs: list[ProgramRun] = []
        frontend.attach(self)

    # -- driving programs ------------------------------------------------------------------

    def run(self, ideal: dict[int, float], seed: int = 0) -> PointResult:
        for spec in self.workload.programs:
            at = spec.arrival_unit / self.rate
            self.clock.schedule(at, functools.partial(self._arrive, spec, at))
        self.clock.run()
        unfinished = [p for p in self.programs if p.finished_at is None]
        if unfinished:
            raise RuntimeError(
                f"{self.frontend.name}: {len(unfinished)} programs never finished "
                f"(first: {unfinished[0].spec.name})"
            )
        return collect(self, ideal, seed)

    def _arrive(self, spec: ProgramSpec, at: float) -> None:
        prog = ProgramRun(spec, at)
        prog.calls = [CallRun(prog, c, len(c.deps)) for c in spec.calls]
        prog.open_calls = len(prog.calls)
        prog.dependents = spec.dependents
        self.programs.append(prog)
        self.frontend.program_arrived(prog)
        for call in prog.calls:
            if call.deps_left == 0:
                self._ready(call)

    def _ready(self, call: CallRun) -> None:
        spec = call.spec
        if spec.base is None:
            call.prompt = Prompt.from_segments(spec.append)
        else:
            base = call.prog.calls[spec.base].sequence
            assert base is not None
            call.prompt = base.extend_segments(spec.append)
        call.ready_at = self.clock.now()
        self.frontend.submit(call)

    def send(
        self,
        call: CallRun,
        replica: int,
        *,
        priority: int = 0,
        pin_ttl_s: float | None = None,
        is_last_step: bool = False,
    ) -> SimRequest:
        """Submit `call` to engine `replica` now (frontends call this)."""
        assert call.prompt is not None
        req = SimRequest(
            call.prompt,
            call.spec.output_tokens,
            output_key=call.spec.output_key,
            request_id=call.call_id,
            priority=priority,
            program_id=call.prog.program_id,
            pin_ttl_s=pin_ttl_s,
            is_last_step=is_last_step,
            on_first_token=functools.partial(self.frontend.on_first_token, call),
            on_finish=functools.partial(self._finished, call),
        )
        call.request = req
        call.replica = replica
        self.engines[replica].submit(req)
        return req

    def _finished(self, call: CallRun, req: SimRequest) -> None:
        call.sequence = req.sequence
        self.frontend.on_finish(call, req)
        tool = call.spec.tool
        if tool is not None:
            d = call.spec.tool_s
            self.clock.call_later(d, lambda: self._tool_done(call, tool, d))
        else:
            self._after_tool(call)

    def _tool_done(self, call: CallRun, tool: str, duration: float) -> None:
        self.frontend.tool_done(call, tool, duration)
        self._after_tool(call)

    def _after_tool(self, call: CallRun) -> None:
        wait = call.spec.human_wait_s
        if wait > 0:
            self.clock.call_later(wait, lambda: self._settled(call))
        else:
            self._settled(call)

    def _settled(self, call: CallRun) -> None:
        prog = call.prog
        prog.open_calls -= 1
        for dep in prog.dependents[call.spec.index]:
            nxt = prog.calls[dep]
            nxt.deps_left -= 1
            if nxt.deps_left == 0:
                self._ready(nxt)
        if prog.open_calls == 0:
            prog.finished_at = self.clock.now()
            self.frontend.program_done(prog)


# -- the physical limit ------------------------------------------------------------------


def decode_alone_s(profile: Profile, context: int, n_steps: int) -> float:
    """`n_steps` decode steps of a lone request whose context starts at `context` tokens."""
    if n_steps <= 0:
        return 0.0
    f, bw = profile.effective_flops, profile.effective_bandwidth
    attn = profile.attn_flops_per_ctx_token
    kv = profile.kv_bytes_per_token
    # step i (context L = context + i): flops 2P + attn (L + 1); bytes W + kv (L + 1)
    a = (2.0 * profile.model.params + attn * (context + 1)) / f
    b = attn / f
    c = (profile.weight_bytes + kv * (context + 1)) / bw
    e = kv / bw
    return n_steps * profile.efficiency.step_overhead_s + sum_max_linear(a, b, c, e, n_steps)


def _shared_keys(workload: Workload, block_size: int) -> set[int]:
    """Block keys of the prompts shared by many programs (system prompts)."""
    keys: set[int] = set()
    for key, n in workload.shared_segments.items():
        keys.update(Prompt.from_segments([(key, n)], block_size).keys)
    return keys


def _known_prefix_tokens(prompt: Prompt, known: set[int], block_size: int, start: int = 0) -> int:
    """Prompt tokens of its longest prefix of `known` blocks, counted from block `start`
    (the blocks before it taken as known), at most prompt - 1 (the engine's hit rule)."""
    keys = prompt.keys
    m = start
    while m < len(keys) and keys[m] in known:
        m += 1
    return min(prompt.ends[m - 1] * block_size if m else 0, prompt.num_tokens - 1)


def ideal_times(workload: Workload, profile: Profile) -> dict[int, float]:
    """Each program's JCT alone on an empty replica with a perfect prefix cache."""
    bs = profile.engine.block_size
    shared_keys = _shared_keys(workload, bs)
    out: dict[int, float] = {}
    for prog in workload.programs:
        seqs: list[Prompt] = []
        known: set[int] = set(shared_keys)
        finish: list[float] = []
        for c in prog.calls:
            if c.base is None:
                prompt = Prompt.from_segments(c.append, bs)
                start_i = 0
            else:
                prompt = seqs[c.base].extend_segments(c.append)
                start_i = len(seqs[c.base].keys)
            hit = _known_prefix_tokens(prompt, known, bs, start_i)
            llm = profile.prefill_time(prompt.num_tokens, hit) + decode_alone_s(
                profile, prompt.num_tokens, c.output_tokens - 1
            )
            seq = prompt.extend_segments([(c.output_key, c.output_tokens)])
            seqs.append(seq)
            known.update(seq.keys)
            start = max((finish[d] for d in c.deps), default=0.0)
            finish.append(start + llm + c.tool_s + c.human_wait_s)
        out[prog.pid] = max(finish)
    return out


# -- metrics -----------------------------------------------------------------------------


class ServiceModel:
    """GPU token-time of a call: prefill of its uncached prompt plus its output tokens'
    share of decode steps at a reference batch. "Service" for least-attained-service,
    fair shares and tenants' token-time shares."""

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

    def of(self, req: SimRequest) -> float:
        """The service a finished request received."""
        return self.service_s(req.prompt_tokens, req.cached_tokens or 0, req.output_tokens)


#: the first part of the arrival span is warm-up: its programs met an emptier cluster
WARMUP = 0.25


@dataclass
class PointResult:
    """What one system did at one arrival rate on one seed's programs.

    Programs are *measured* when they arrive after the warm-up (the first `WARMUP` of the
    arrival span, when the cluster was still filling); throughput and tenants' token-time
    count what finished between the warm-up's end and the last arrival."""

    system: str
    rate_per_min: float
    seed: int
    #: measured programs: (JCT, ideal JCT, tenant)
    measured: list[tuple[float, float, str]]
    throughput_per_min: float
    prompt_tokens: int
    hit_tokens: int
    recomputed_tokens: int
    preemptions: int
    pins: dict[str, int]
    frontend: dict[str, Any]
    #: tenant -> GPU token-time of its calls that finished in the window
    tenant_service_s: dict[str, float]
    busy: float

    @property
    def jct_mean_s(self) -> float:
        return mean([j for j, _, _ in self.measured])

    @property
    def ideal_mean_s(self) -> float:
        return mean([i for _, i, _ in self.measured])

    @property
    def slowdown(self) -> float:
        """Mean JCT over mean ideal JCT: what capacity is judged by."""
        return self.jct_mean_s / self.ideal_mean_s

    def tenant_slowdowns(self) -> dict[str, float]:
        """Each tenant's mean JCT / ideal over its programs."""
        by: dict[str, list[float]] = {}
        for j, i, t in self.measured:
            by.setdefault(t, []).append(j / i)
        return {t: mean(v) for t, v in sorted(by.items())}


def collect(sim: Simulation, ideal: dict[int, float], seed: int = 0) -> PointResult:
    bs = sim.profile.engine.block_size
    model = ServiceModel(sim.profile)
    arrivals = [p.arrival for p in sim.programs]
    first, last = min(arrivals), max(arrivals)
    t0 = first + WARMUP * (last - first)
    prompt_tokens = hit = recomputed = 0
    finished_in_window = 0
    tenant_service: dict[str, float] = {}
    measured: list[tuple[float, float, str]] = []
    # recomputed prompt tokens: what a call computed that its program (or a shared prompt)
    # had computed before: uncached prompt tokens beyond the content that is new to the
    # program, plus the engine's recomputation after preemption
    shared_keys = _shared_keys(sim.workload, bs)
    for prog in sim.programs:
        assert prog.finished_at is not None
        if prog.arrival >= t0:
            measured.append((prog.finished_at - prog.arrival, ideal[prog.spec.pid], prog.tenant))
        if t0 <= prog.finished_at <= last:
            finished_in_window += 1
        known: set[int] = set(shared_keys)
        for call in prog.calls:
            req = call.request
            assert req is not None and call.prompt is not None and call.sequence is not None
            prompt_tokens += req.prompt_tokens
            cached = req.cached_tokens or 0
            hit += cached
            could = _known_prefix_tokens(call.prompt, known, bs)
            recomputed += max(0, could - cached) + req.recomputed_tokens
            known.update(call.sequence.keys)
            if req.finish_time is not None and t0 <= req.finish_time <= last:
                tenant_service[prog.tenant] = tenant_service.get(prog.tenant, 0.0) + model.of(req)
    metrics = [e.metrics() for e in sim.engines]
    makespan = sim.clock.now()
    return PointResult(
        system=sim.frontend.name,
        rate_per_min=sim.rate * 60.0,
        seed=seed,
        measured=measured,
        throughput_per_min=finished_in_window / max(last - t0, 1e-9) * 60.0,
        prompt_tokens=prompt_tokens,
        hit_tokens=hit,
        recomputed_tokens=recomputed,
        preemptions=sum(m.preemptions for m in metrics),
        pins={
            "set": sum(m.pins_set for m in metrics),
            "released": sum(m.pins_released for m in metrics),
            "expired": sum(m.pins_expired for m in metrics),
            "refused": sum(m.pins_refused for m in metrics),
        },
        frontend=sim.frontend.stats(),
        tenant_service_s=tenant_service,
        busy=mean([m.busy_s / makespan for m in metrics]) if makespan > 0 else 0.0,
    )
