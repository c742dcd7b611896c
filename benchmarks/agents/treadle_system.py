"""The `treadle` system of `treadle bench agents`: treadle's own scheduler
(`treadle.runtime.sched.scheduler.Scheduler`) and pinning policy (`runtime.sched.pinning`)
in front of the engines — the same code `SchedulerAdmission` runs for real runs; this
module only measures what the runtime would measure and passes it on.

- Every replica is a lane with a KV budget (its KV capacity in tokens). A program is
  admitted to a lane only while the working sets fit (`residency.py`); the working set
  is measured here as a real deployment would: the prompt the program sends plus the
  answer it is expected to write, and after a call the conversation it continues.
- After each call the program goes idle for its tool, predicted by `ToolDurations` (the
  declared duration, then observed ones); at the end of a turn it waits for a person and
  is suspended at once (`Scheduler.idle(..., human=True)`): no KV is held across a human
  wait.
- Calls go to the engine with their program's PLAS level as the priority
  (`policy="priority"`); the scheduler's in-flight limit stays at the engine's seats (the
  memory is what admission controls; nothing shrinks it).
- A resident program's conversation is pinned while its tool runs, for a quantile of the
  tool's predicted duration chosen by `PinPolicy` with the memory already reserved for it
  (pressure 0): the pin is what keeps the reservation's blocks from eviction. It is
  released when the next call is scheduled, when the program is suspended (the engine's
  `release_pins`), when it ends, or by the engine under pressure (`pin_pressure="release"`).
  The engine puts no cap on pinned memory (`max_pinned_fraction=1.0`): every pin holds
  memory its resident has reserved.
"""

from __future__ import annotations

from typing import Any

from treadle.backends.sim import EngineConfig, SimRequest
from treadle.benchmarks.agents.baselines import LAS_QUANTUM_S
from treadle.benchmarks.agents.frontend import Frontend, ServiceModel
from treadle.benchmarks.agents.sim import CallRun, ProgramRun, Simulation
from treadle.runtime.sched.entities import Program
from treadle.runtime.sched.limits import LimitConfig
from treadle.runtime.sched.pinning import PinPolicy, PinRequest, ToolDurations
from treadle.runtime.sched.scheduler import Call, Scheduler, SchedulerConfig

#: output tokens expected of a call before any was measured
FIRST_OUTPUT_GUESS = 256


class TreadleSystem(Frontend):
    """treadle's scheduler and pinning policy in front of the engines (module docstring)."""

    name = "treadle"

    def __init__(self, *, config: SchedulerConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.pins_requested = 0
        self.pins_declined = 0
        # answers' lengths: per program, and over all programs for a first guess
        self._outputs: dict[str, tuple[int, int]] = {}
        self._all_outputs = (0, 0)
        #: per program: KV tokens of its calls in flight, and of the conversation it goes on
        self._live: dict[str, dict[int, int]] = {}
        self._carried: dict[str, int] = {}

    def engine_config(self) -> EngineConfig:
        # no cap on pinned memory: admission has reserved every resident's working set, so
        # a resident's pin takes nothing that is not its own (the engine's default cap of
        # half the KV would drop the pins of the residents that happen to pin last)
        return EngineConfig(policy="priority", pin_pressure="release", max_pinned_fraction=1.0)

    def attach(self, sim: Simulation) -> None:
        self.sim = sim
        self.model = ServiceModel(sim.profile)
        seats = sim.engines[0].max_num_seqs
        config = self.config or SchedulerConfig(
            las_quantum_s=LAS_QUANTUM_S,
            limits=LimitConfig(initial=seats, minimum=1, maximum=seats),
        )
        self.sched = Scheduler(
            [e.name for e in sim.engines],
            config,
            kv_budgets=[e.cache.total * e.block_size for e in sim.engines],
            on_suspend=self._suspended,
        )
        for tenant, weight in sim.workload.tenants.items():
            self.sched.set_weight(tenant, weight)
        self.durations = ToolDurations()
        for name, declared in sim.workload.declared_durations.items():
            self.durations.declare(name, declared)
        self.pin_policy = PinPolicy(self.durations)

    # -- measuring what the runtime would measure ------------------------------------------

    def _expected_output(self, pid: str) -> int:
        n, total = self._outputs.get(pid, self._all_outputs)
        return total // n if n else FIRST_OUTPUT_GUESS

    def _working_set(self, pid: str) -> int:
        return sum(self._live.get(pid, {}).values()) + self._carried.get(pid, 0)

    def _suspended(self, p: Program, reason: str) -> None:
        assert self.sim is not None
        if p.home is not None:
            self.sim.engines[p.home].release_pins(p.program_id)

    # -- the call path -------------------------------------------------------------------

    def program_arrived(self, prog: ProgramRun) -> None:
        first = prog.spec.calls[0]
        pid = prog.program_id
        self.sched.open_program(
            pid,
            prog.tenant,
            self.now,
            kv_tokens=first.prompt_tokens + self._expected_output(pid),
        )
        self._pump()

    def submit(self, call: CallRun) -> None:
        assert call.prompt is not None
        pid = call.prog.program_id
        out = self._expected_output(pid)
        if call.spec.base is not None:
            self._carried[pid] = 0  # this prompt carries the conversation on
        self._live.setdefault(pid, {})[call.spec.index] = call.prompt.num_tokens + out
        self.sched.set_working_set(pid, self._working_set(pid), self.now)
        p = self.sched.programs.get(pid)
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

    def _send(self, c: Call) -> None:
        assert self.sim is not None
        run: CallRun = c.payload
        assert run.prompt is not None and c.assigned is not None
        spec = run.spec
        ttl = None
        # a pin only helps when the next call continues this conversation after a tool
        # (a tool loop inside one llm node), never across a person's answer
        if spec.tool is not None and spec.continues and not spec.is_last_step:
            tokens = run.prompt.num_tokens + self._expected_output(c.program_id)
            decision = self.pin_policy.decide(
                PinRequest(
                    tokens=tokens,
                    prefill_s=self.model.prefill_s(tokens),
                    capacity_tokens=self.sim.engines[c.assigned].cache.total
                    * self.sim.engines[c.assigned].block_size,
                    pressure=self.sched.pin_pressure(c.program_id, self.pressure(c.assigned)),
                    tool=spec.tool,
                    is_last_step=spec.is_last_step or spec.human_wait_s > 0,
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

    def pressure(self, replica: int) -> float:
        assert self.sim is not None
        e = self.sim.engines[replica]
        return 1.0 if e.num_waiting else e.kv_usage

    def on_first_token(self, call: CallRun, req: SimRequest) -> None:
        return None

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        pid = call.prog.program_id
        n, total = self._outputs.get(pid, (0, 0))
        self._outputs[pid] = (n + 1, total + req.output_tokens)
        an, atotal = self._all_outputs
        self._all_outputs = (an + 1, atotal + req.output_tokens)
        now = self.now
        self.sched.complete(call.handle, now, service_s=self.model.of(req))
        self._live.get(pid, {}).pop(call.spec.index, None)
        spec = call.spec
        if spec.continues or spec.human_wait_s > 0:
            assert call.sequence is not None
            self._carried[pid] = call.sequence.num_tokens
        self.sched.set_working_set(pid, self._working_set(pid), now)
        if spec.human_wait_s > 0:
            self.sched.idle(pid, now, 0.0, human=True)
        elif spec.tool is not None:
            self.sched.idle(pid, now, self.durations.estimator(spec.tool).mean())
        self._pump()

    def tool_done(self, call: CallRun, tool: str, duration_s: float) -> None:
        self.durations.observe(tool, duration_s)

    def program_done(self, prog: ProgramRun) -> None:
        assert self.sim is not None
        pid = prog.program_id
        p = self.sched.programs.get(pid)
        if p is not None and p.home is not None:
            # the run ended: nothing of it is worth holding any more
            self.sim.engines[p.home].release_pins(pid)
        for table in (self._outputs, self._live, self._carried):
            table.pop(pid, None)
        self.sched.close_program(pid, self.now)
        self._pump()

    def stats(self) -> dict[str, Any]:
        s = self.sched
        return {
            "pins_requested": self.pins_requested,
            "pins_declined": self.pins_declined,
            "suspensions": dict(s.suspensions),
            "steals": s.steals,
            "starvation_promotions": s.starvation_promotions,
            "backfilled": s.backfilled,
        }
