"""The gateway's scheduler: every call of every client is a call of one `Scheduler`
(`treadle.runtime.sched.scheduler`), one lane per served model, so the calls of all
workers are ordered together: tenant fair shares by weight, least attained service per
program, critical path within a program, and a learned in-flight limit per model (or a
fixed one, `max_in_flight`).

Programs come from the hints (`program_id`, else a session header); a call without either
is a program of its own, closed when it finishes. A program ends after its
`last_llm_step`, is suspended at once before a `human_wait` (it holds nothing while a
person thinks), and is told the next tool's predicted duration otherwise; a program with
no call for `program_idle_s` is closed (its run ended without saying so).

The cost of a call (GPU seconds, what fair shares count) is estimated at dispatch from the
prompt and the expected answer (the program's mean answer so far, else its tenant's, else
all tenants', else the cap), and corrected at completion from the usage the engine
reports, as in `SchedulerAdmission`: a call is charged its estimate while it runs, so a
poor guess swings the shares until it finishes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio

from treadle.backends.openai_compat.hint_wire import WireHints
from treadle.errors import GatewayError
from treadle.runtime.sched.limits import AIMDLimit, LimitConfig, TTFTSignal
from treadle.runtime.sched.scheduler import DISPATCHED, Call, Scheduler

#: cost model of a call (as `SchedulerAdmission`'s defaults)
PREFILL_TOKENS_PER_S = 20_000.0
DECODE_S_PER_TOKEN = 0.002
#: an answer's expected length when the client sets no cap
DEFAULT_OUTPUT_TOKENS = 256


class CallWithdrawn(GatewayError):
    """The call's program was closed while the call waited."""


@dataclass(eq=False, slots=True)
class Admitted:
    """A call the scheduler let go; `finish` it exactly once."""

    call: Call
    program_id: str
    hints: WireHints
    one_call: bool
    prompt_tokens: int
    sent_at: float


@dataclass(slots=True)
class ProgramInfo:
    """What the gateway remembers of a program (the table kept in Redis)."""

    tenant: str
    last_seen: float
    calls: int = 0
    #: answers so far and their tokens (the next answer's expected length)
    outputs: int = 0
    output_tokens: int = 0


class GatewayScheduler:
    """One `Scheduler` over the served models (module docstring)."""

    def __init__(
        self,
        models: Iterable[tuple[str, int | None]],
        *,
        tenant_weights: dict[str, float] | None = None,
        program_idle_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.program_idle_s = program_idle_s
        self.scheduler = Scheduler([])
        self._lanes: dict[str, int] = {}
        for name, fixed in models:
            lane = self.scheduler.add_lane(name)
            if fixed is not None:
                config = LimitConfig(initial=fixed, minimum=fixed, maximum=fixed)
            else:
                config = LimitConfig()
            self.scheduler.lanes[lane].limit = AIMDLimit(config)
            self._lanes[name] = lane
        self._adaptive = {name for name, fixed in models if fixed is None}
        for tenant, weight in (tenant_weights or {}).items():
            self.scheduler.set_weight(tenant, weight)
        self.ttft = TTFTSignal(tolerance=4.0, slack_s=0.25)
        self.programs: dict[str, ProgramInfo] = {}
        #: attained service of programs known from before a restart (Redis), by id
        self.restored_attained: dict[str, float] = {}
        self._ids = itertools.count(1)
        #: tenants and programs changed since the state store last saved them
        self.dirty_tenants: set[str] = set()
        self.dirty_programs: set[str] = set()
        self.closed_programs: set[str] = set()
        #: mean answer length per tenant (moving), for programs with no answer yet
        self._tenant_output: dict[str, float] = {}
        self._any_output: float | None = None

    # -- calls ---------------------------------------------------------------------------

    async def admit(
        self,
        model: str,
        hints: WireHints,
        program_id: str | None,
        prompt_tokens: int,
        max_tokens: int | None,
    ) -> Admitted:
        """Queue the call and return once the scheduler dispatches it (at once when its
        model has room and no one is ahead of it)."""
        sched = self.scheduler
        now = self.clock()
        one_call = program_id is None
        pid = program_id if program_id is not None else f"call-{next(self._ids)}"
        tenant = hints.tenant or "default"
        info = self.programs.get(pid)
        if info is None:
            info = self.programs[pid] = ProgramInfo(tenant, now)
            self.closed_programs.discard(pid)
        info.last_seen = now
        info.calls += 1
        output = self._expected_output(info, tenant, max_tokens)
        call = Call(
            f"{pid}#{info.calls}",
            pid,
            est_service_s=prompt_tokens / PREFILL_TOKENS_PER_S + output * DECODE_S_PER_TOKEN,
            remaining_cost_s=hints.remaining_cost_s or float(hints.steps_to_execution or 0),
            lane=self._lanes[model],
        )
        if pid not in sched.programs:
            attained = self.restored_attained.pop(pid, None)
            if attained:
                # a program from before a restart keeps its least-attained-service level
                p = sched.open_program(pid, tenant, now)
                p.attained_s = attained
                p.level = sched.level_of(attained)
        sched.submit(call, now, tenant=tenant)
        self._pump()
        if call.state != DISPATCHED:
            event = anyio.Event()
            call.payload = event
            try:
                await event.wait()
            except BaseException:
                if not sched.cancel_call(call) and call.state == DISPATCHED:
                    sched.complete(call, self.clock())
                if one_call:
                    self._close(pid)
                self._pump()
                raise
            if call.state != DISPATCHED:
                raise CallWithdrawn(f"program {pid} was closed while its call waited")
        return Admitted(call, pid, hints, one_call, prompt_tokens, self.clock())

    def finish(
        self,
        admitted: Admitted,
        *,
        prompt_tokens: int | None,
        cached_tokens: int,
        completion_tokens: int | None,
        ttft_s: float | None,
        ok: bool,
    ) -> None:
        """The call ended (`ok`: with an answer). Its real cost replaces the estimate;
        the program learns what comes next (its end, a tool, a person)."""
        sched = self.scheduler
        now = self.clock()
        call = admitted.call
        congested: bool | None = None
        service: float | None = None
        if ok:
            prompt = prompt_tokens or admitted.prompt_tokens
            service = (
                max(0, prompt - cached_tokens) / PREFILL_TOKENS_PER_S
                + (completion_tokens or 0) * DECODE_S_PER_TOKEN
            )
            if sched.lanes[call.lane or 0].name in self._adaptive:
                congested = self.ttft.congested(ttft_s, prompt)
        sched.complete(call, now, service_s=service, congested=congested)
        pid = admitted.program_id
        if ok and completion_tokens:
            self._learn_output(pid, admitted.hints.tenant or "default", completion_tokens)
        p = sched.programs.get(pid)
        if p is not None:
            self.dirty_tenants.add(p.tenant.name)
            self.dirty_programs.add(pid)
        hints = admitted.hints
        if admitted.one_call or (ok and hints.last_llm_step):
            self._close(pid)
        elif p is not None and not p.busy:
            if hints.human_wait:
                sched.idle(pid, now, 0.0, human=True)
            elif hints.tool_duration_s is not None:
                sched.idle(pid, now, hints.tool_duration_s)
        self._pump()

    def end_program(self, program_id: str) -> bool:
        """The caller says the program is over; False if it was not open."""
        if program_id not in self.programs:
            return False
        self._close(program_id)
        self._pump()
        return True

    def expire_idle(self) -> int:
        """Close programs with no call for `program_idle_s`; returns how many."""
        now = self.clock()
        sched = self.scheduler
        stale = [
            pid
            for pid, info in self.programs.items()
            if now - info.last_seen > self.program_idle_s
            and (pid not in sched.programs or not sched.programs[pid].busy)
        ]
        for pid in stale:
            self._close(pid)
        if stale:
            self._pump()
        return len(stale)

    # -- views ---------------------------------------------------------------------------

    def lane_of(self, model: str) -> int:
        return self._lanes[model]

    def waiting(self) -> int:
        """Calls not yet sent: queued on a lane, or with a program waiting for admission."""
        return len(self.scheduler.calls) - self.in_flight()

    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.scheduler.lanes)

    def service_by_tenant(self) -> dict[str, float]:
        return {t.name: t.service_s for t in self.scheduler.tenants.values()}

    # -- internals -----------------------------------------------------------------------

    def _expected_output(self, info: ProgramInfo, tenant: str, max_tokens: int | None) -> float:
        """The answer's expected length: the program's mean so far, else its tenant's,
        else the cap (at most a thousand tokens: a cap is a bound, not an estimate). A
        good guess matters: a call is charged its estimate until it finishes."""
        if info.outputs:
            guess = info.output_tokens / info.outputs
        elif tenant in self._tenant_output:
            guess = self._tenant_output[tenant]
        elif self._any_output is not None:  # a new tenant: what answers are like here
            guess = self._any_output
        else:
            guess = min(max_tokens or DEFAULT_OUTPUT_TOKENS, 1024)
        return min(guess, max_tokens) if max_tokens else guess

    def _learn_output(self, pid: str, tenant: str, tokens: int) -> None:
        info = self.programs.get(pid)
        if info is not None:
            info.outputs += 1
            info.output_tokens += tokens
        old = self._tenant_output.get(tenant)
        self._tenant_output[tenant] = tokens if old is None else old + 0.1 * (tokens - old)
        seen = self._any_output
        self._any_output = tokens if seen is None else seen + 0.1 * (tokens - seen)

    def _close(self, pid: str) -> None:
        p = self.scheduler.programs.get(pid)
        if p is not None:
            self.dirty_tenants.add(p.tenant.name)
        for call in self.scheduler.cancel_program(pid, self.clock()):
            if isinstance(call.payload, anyio.Event):
                call.payload.set()
        if self.programs.pop(pid, None) is not None:
            self.closed_programs.add(pid)
            self.dirty_programs.discard(pid)

    def _pump(self) -> None:
        for call in self.scheduler.dispatch(self.clock()):
            if isinstance(call.payload, anyio.Event):
                call.payload.set()
