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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from treadle.backends.sim import Engine, EngineConfig, Profile, Prompt, SimRequest, VirtualClock
from treadle.backends.sim.profile import sum_max_linear
from treadle.benchmarks.agents.workloads import CallSpec, ProgramSpec, Workload
from treadle.benchmarks.common import mean, percentile
from treadle.runtime.sched.scheduler import jain_index


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
        if kv_capacity_tokens is not None:
            blocks = max(1, kv_capacity_tokens // self.profile.engine.block_size)
            cfg = dataclasses.replace(cfg, kv_capacity_blocks=blocks)
        self.engines = [
            Engine(self.profile, self.clock, cfg, name=f"r{i}") for i in range(replicas)
        ]
        self.programs: list[ProgramRun] = []
        frontend.attach(self)

    # -- driving programs ------------------------------------------------------------------

    def run(self) -> SimResult:
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
        return collect(self)

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
            self._settled(call)

    def _tool_done(self, call: CallRun, tool: str, duration: float) -> None:
        self.frontend.tool_done(call, tool, duration)
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
            finish.append(start + llm + c.tool_s)
        out[prog.pid] = max(finish)
    return out


# -- metrics -----------------------------------------------------------------------------


@dataclass
class SimResult:
    system: str
    rate_per_s: float
    jct: dict[int, float]
    tenants: dict[int, str]
    finished_at: dict[int, float]
    arrivals: dict[int, float]
    prompt_tokens: int
    hit_tokens: int
    recomputed_tokens: int
    preemptions: int
    pins: dict[str, int]
    makespan_s: float
    frontend: dict[str, Any]
    busy_s: list[float]

    def _window(self) -> tuple[float, float] | None:
        """The measurement window: from a warm-up quarter of the arrival span to the last
        arrival; None for fewer than 4 programs."""
        if len(self.arrivals) < 4:
            return None
        first, last = min(self.arrivals.values()), max(self.arrivals.values())
        return first + 0.25 * (last - first), last

    @staticmethod
    def _per_min(times: Iterable[float], window: tuple[float, float]) -> float:
        t0, t1 = window
        return sum(1 for t in times if t0 <= t <= t1) / max(t1 - t0, 1e-9) * 60.0

    def throughput_per_min(self) -> float:
        """Programs finished per minute while programs arrive (after a warm-up quarter)."""
        window = self._window()
        if window is None:
            return len(self.arrivals) / max(self.makespan_s, 1e-9) * 60.0
        return self._per_min(self.finished_at.values(), window)

    def work_ratio(self, ideal: dict[int, float]) -> float:
        """Work finished over work arrived in the measurement window (after a warm-up
        quarter), each program weighted by its ideal JCT: about 1 while the system keeps
        up, below 1 once a backlog builds (the count of programs would hide a backlog of
        big programs behind many small ones)."""
        window = self._window()
        if window is None:
            return 1.0
        t0, t1 = window
        arrived = sum(ideal[p] for p, t in self.arrivals.items() if t0 <= t <= t1)
        done = sum(ideal[p] for p, t in self.finished_at.items() if t0 <= t <= t1)
        return done / arrived if arrived else 1.0

    def arrivals_per_min(self) -> float:
        window = self._window()
        return float("nan") if window is None else self._per_min(self.arrivals.values(), window)

    def metrics(self, ideal: dict[int, float], slo_factor: float = 2.0) -> dict[str, float]:
        jcts = list(self.jct.values())
        ratios = {pid: self.jct[pid] / ideal[pid] for pid in self.jct if ideal.get(pid)}
        by_tenant: dict[str, list[float]] = {}
        for pid, r in ratios.items():
            by_tenant.setdefault(self.tenants[pid], []).append(r)
        slo = [self.jct[pid] <= slo_factor * ideal[pid] for pid in self.jct if pid in ideal]
        return {
            "jct_mean_s": mean(jcts),
            "jct_p50_s": percentile(jcts, 0.5),
            "jct_p95_s": percentile(jcts, 0.95),
            "jct_p99_s": percentile(jcts, 0.99),
            "throughput_per_min": self.throughput_per_min(),
            "offered_per_min": self.arrivals_per_min(),
            "hit_rate": self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "recomputed_tokens": float(self.recomputed_tokens),
            "slo_attainment": sum(slo) / len(slo) if slo else float("nan"),
            "jain": jain_index(mean(v) for v in by_tenant.values()),
            "jct_over_ideal_mean": mean(list(ratios.values())),
            "jct_over_ideal_p99": percentile(list(ratios.values()), 0.99),
            "preemptions": float(self.preemptions),
            "pins_set": float(self.pins.get("set", 0)),
            "makespan_s": self.makespan_s,
        }

    def tenant_means(self, ideal: dict[int, float]) -> dict[str, float]:
        by_tenant: dict[str, list[float]] = {}
        for pid, j in self.jct.items():
            by_tenant.setdefault(self.tenants[pid], []).append(j / ideal[pid])
        return {t: mean(v) for t, v in sorted(by_tenant.items())}


def collect(sim: Simulation) -> SimResult:
    bs = sim.profile.engine.block_size
    prompt_tokens = hit = recomputed = 0
    # recomputed prompt tokens: what a call computed that its program (or a shared prompt)
    # had computed before: uncached prompt tokens beyond the content that is new to the
    # program, plus the engine's recomputation after preemption
    shared_keys = _shared_keys(sim.workload, bs)
    for prog in sim.programs:
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
    metrics = [e.metrics() for e in sim.engines]
    return SimResult(
        system=sim.frontend.name,
        rate_per_s=sim.rate,
        jct={p.spec.pid: p.finished_at - p.arrival for p in sim.programs if p.finished_at},
        tenants={p.spec.pid: p.tenant for p in sim.programs},
        finished_at={p.spec.pid: p.finished_at for p in sim.programs if p.finished_at},
        arrivals={p.spec.pid: p.arrival for p in sim.programs},
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
        makespan_s=sim.clock.now(),
        frontend=sim.frontend.stats(),
        busy_s=[m.busy_s for m in metrics],
    )
