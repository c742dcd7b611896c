"""Workflow-atomic scheduling: the order in which the LLM calls of all runs reach backends.

The `Scheduler` is the policy core, pure data with no I/O and no clock of its own (every
method takes `now`), like vLLM v1's `core/sched`: the agents benchmark drives it in virtual
time, `admission.SchedulerAdmission` puts it behind the runtime's `CallAdmission` hook, and
`treadle gateway` serves every worker's calls from one. It decides at two levels.

**Programs: admission and KV residency** (`residency.py`, `waitlist.py`). A program is
admitted to a lane (replica) before any of its calls is scheduled, and stays resident
with a reservation of its KV working set (`set_working_set`); a lane admits only while
the working sets fit its KV budget, so an admitted program keeps its cache and one not
admitted holds no KV. Residents that outgrow a lane are relieved by suspending idle ones
(longest predicted idle first); a program waiting for a human is suspended at once. The
admission queue is ordered by tenant fair share, least attained service, then arrival;
a head that fits nowhere holds the lane where it will fit soonest while up to `backfill`
programs behind it may take the others. Lanes without a known budget admit while the
calls of admitted runs do not back up. The design and what measured it:
docs/benchmarks.md, "treadle's scheduler".

**Calls: order on a lane.** Each lane lets `limit` calls be in flight (AIMD on observed
congestion, `limits.py`, where the backend's memory is unknown). The next call is chosen
by (1) **fair share across tenants** by weight, in virtual time (start-time fair
queueing: serving a call advances its tenant by `service / weight` GPU seconds, estimated
at dispatch and corrected at completion; a run's expected service is charged at admission
and drawn down by its calls; a tenant that had no run open rejoins at the system's
virtual time), then (2) **least attained service** within the tenant (`(level, program
arrival)`; a call waiting `starvation_s` goes first), then (3) **critical path** within
the program (most estimated work remaining after the call first).

Every decision is O(log n): heaps of tenants per lane, of programs per (lane, tenant), of
calls per (lane, program) and by age per lane, with lazy deletion (stale entries are
dropped when they reach the top); admission likewise (O(backfill x log n) when the head is
blocked). `count_comparisons=True` counts key comparisons (`comparisons`), so a test
checks the bound by counting, not timing. Priorities passed to backends are the program's
level (lower runs first), so the engine's queue and preemption agree with this order.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

from treadle.runtime.sched.config import SchedulerConfig
from treadle.runtime.sched.entities import (
    CANCELLED,
    DISPATCHED,
    DONE,
    PENDING,
    QUEUED,
    Call,
    Counted,
    Lane,
    Placer,
    Program,
    ProgramQueue,
    StealCheck,
    SuspendListener,
    Tenant,
    TenantQueue,
)
from treadle.runtime.sched.limits import AIMDLimit
from treadle.runtime.sched.residency import (
    ResidencyConfig,
    choose_lane,
    choose_victims,
    fits,
    overflowing,
    reserved_lane,
)
from treadle.runtime.sched.waitlist import AdmissionQueue

__all__ = [
    "CANCELLED",
    "DISPATCHED",
    "DONE",
    "PENDING",
    "QUEUED",
    "Call",
    "Lane",
    "Program",
    "ResidencyConfig",
    "Scheduler",
    "SchedulerConfig",
    "Tenant",
]


class Scheduler:
    """The scheduling core (module docstring). Not thread-safe; one per event loop."""

    def __init__(
        self,
        lanes: int | Sequence[str] = 1,
        config: SchedulerConfig | None = None,
        *,
        kv_budgets: Sequence[int | None] | None = None,
        place: Placer | None = None,
        can_steal: StealCheck | None = None,
        on_suspend: SuspendListener | None = None,
        admission: bool = True,
        count_comparisons: bool = False,
    ) -> None:
        self.config = config or SchedulerConfig()
        names = [f"lane-{i}" for i in range(lanes)] if isinstance(lanes, int) else list(lanes)
        if isinstance(lanes, int) and lanes < 1:
            raise ValueError("a scheduler needs at least one lane (or lane names, maybe none yet)")
        budgets = list(kv_budgets) if kv_budgets is not None else [None] * len(names)
        if len(budgets) != len(names):
            raise ValueError("kv_budgets needs one entry per lane")
        self.lanes = [
            Lane(i, n, AIMDLimit(self.config.limits), b)
            for i, (n, b) in enumerate(zip(names, budgets, strict=True))
        ]
        self.tenants: dict[str, Tenant] = {}
        self.programs: dict[str, Program] = {}
        self.calls: dict[str, Call] = {}
        self._place = place
        self._can_steal = can_steal
        self.on_suspend = on_suspend
        self.admission_enabled = admission
        self._seq = itertools.count(1)
        self._counter = [0]
        self._counting = count_comparisons
        #: system virtual time: the tenant key of the latest dispatch
        self.vtime = 0.0
        self.waitlist = AdmissionQueue(self._key, self.config.starvation_s)
        self.active_programs = 0
        self.queued_calls = 0
        self.steals = 0
        self.starvation_promotions = 0
        #: programs admitted past a blocked head (backfilling), and the state of the last
        #: full try: the lane held for the head and every lane's free KV
        self.backfilled = 0
        self._backfill_lane: int | None = None
        self._backfill_free: list[float] = []
        #: the program that joined the admission queue since the last admission pass
        self._joined: Program | None = None
        self.suspensions: dict[str, int] = {}

    # -- bookkeeping helpers -------------------------------------------------------------

    @property
    def pending_programs(self) -> int:
        """Programs waiting for admission."""
        return self.waitlist.count

    @property
    def comparisons(self) -> int:
        return self._counter[0]

    def _key(self, *parts: Any) -> Any:
        return Counted(parts, self._counter) if self._counting else parts

    def tenant(self, name: str | None, weight: float | None = None) -> Tenant:
        """The tenant called `name` (created on first use; `weight` sets its weight)."""
        key = name or "default"
        t = self.tenants.get(key)
        if t is None:
            t = self.tenants[key] = Tenant(key, vtime=self.vtime)
        if weight is not None:
            if not weight > 0:
                raise ValueError(f"tenant {key!r}: weight must be > 0")
            t.weight = float(weight)
        return t

    def set_weight(self, tenant: str, weight: float) -> None:
        self.tenant(tenant, weight)

    def level_of(self, attained_s: float) -> int:
        q = self.config.las_quantum_s
        if attained_s < q:
            return 0
        return min(self.config.las_levels - 1, 1 + int(math.log2(attained_s / q)))

    def _rejoin(self, t: Tenant) -> None:
        """A tenant that had no run open rejoins at the system's virtual time (no banked
        credit). One with runs open is not idle, even when none of its calls is queued this
        instant (they run, or wait for tools): it keeps its virtual time."""
        if not t.open_programs and t.vtime < self.vtime:
            t.vtime = self.vtime
            t.version += 1

    def _rekey(self, t: Tenant) -> None:
        """`t`'s virtual time moved: every lane where it still has work gets a fresh entry
        (the old ones are stale by version and dropped when they surface)."""
        t.version += 1
        key = self._key(t.vtime, t.dispatched, t.name)
        for lane_i in t.lanes_with_work:
            lane = self.lanes[lane_i]
            heapq.heappush(lane.tenant_heap, (key, lane.tenant_queues[t.name], t.version))

    # -- programs: opening, admission, residency -------------------------------------------

    def open_program(
        self,
        program_id: str,
        tenant: str | None = None,
        now: float = 0.0,
        *,
        home: int | None = None,
        kv_tokens: int = 0,
        info: dict[str, Any] | None = None,
    ) -> Program:
        """A run arrives. It waits for admission (unless admission is off); `kv_tokens`
        is its first working set (its first prompt and answer)."""
        p = self._new_program(program_id, tenant, now, home=home, info=info)
        p.kv_tokens = max(0, int(kv_tokens))
        self._queue_for_admission(p, now)
        return p

    def _new_program(
        self,
        program_id: str,
        tenant: str | None,
        now: float,
        *,
        home: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> Program:
        if program_id in self.programs:
            raise ValueError(f"program {program_id!r} is already open")
        t = self.tenant(tenant)
        self._rejoin(t)
        t.open_programs += 1
        p = Program(program_id, t, now, next(self._seq), home=home, info=dict(info or {}))
        self.programs[program_id] = p
        return p

    def _queue_for_admission(self, p: Program, now: float) -> None:
        if not self.admission_enabled:
            self._admit(p, p.home if p.home is not None else self._least_loaded(p), now)
            return
        self._wait_for_admission(p, now)
        self.admit_waiting(now)

    def _wait_for_admission(self, p: Program, now: float) -> None:
        self.waitlist.push(p, now)
        self._joined = p

    def admit_waiting(self, now: float) -> int:
        """Admit waiting runs while the lanes can carry them; returns how many. In order:
        a run that waited `starvation_s`, else tenants by virtual time and, within one,
        least attained service then arrival. A head that fits on no lane with a KV budget
        holds the lane where it will fit soonest, and runs behind it may be admitted to
        the other lanes meanwhile (`_backfill`): nothing passes it on its own lane, so a
        large run is not starved by a stream of small ones, and memory that frees on
        another lane does not sit idle behind it, whichever tenant is next."""
        admitted = 0
        joined, self._joined = self._joined, None
        while (p := self.waitlist.peek(now)) is not None:
            lane = self._lane_for(p)
            if lane is None:
                if self.config.backfill and self._budgeted and self._below_cap():
                    admitted += self._backfill(p, joined, now)
                break
            self._take_waiting(p, lane, now)
            admitted += 1
        return admitted

    @property
    def _budgeted(self) -> bool:
        return any(lane.kv_budget is not None for lane in self.lanes)

    def _below_cap(self) -> bool:
        cap = self.config.max_active_programs
        return cap is None or self.active_programs < cap

    def _take_waiting(self, p: Program, lane: int, now: float) -> None:
        if self.waitlist.starved(p, now):
            self.starvation_promotions += 1
        self.waitlist.remove(p, now)
        self._admit(p, lane, now)

    def _backfill(self, head: Program, joined: Program | None, now: float) -> int:
        """Admit runs behind `head` (which fits nowhere) to lanes other than the one held
        for it. The `backfill` runs next in order are tried only when memory has freed on
        one of those lanes since they were last tried (else they would not fit now either);
        a run that just joined the queue is tried on its own. Runs tried and not admitted
        keep their places. O(backfill x log n) per memory event, O(log n) per arrival."""
        held = reserved_lane(head, self.lanes)
        free = [ln.kv_free() for ln in self.lanes]
        seen = self._backfill_free
        unchanged = len(seen) == len(free) and all(
            f <= s for i, (f, s) in enumerate(zip(free, seen, strict=True)) if i != held
        )
        if held == self._backfill_lane and unchanged:
            if joined is None or joined is head or joined.waiting_since is None:
                return 0
            lane = self._lane_for(joined, exclude=held)
            if lane is None:
                return 0
            self._take_waiting(joined, lane, now)
            self.backfilled += 1
            self._backfill_free = [ln.kv_free() for ln in self.lanes]
            return 1
        looked: list[tuple[Program, float | None]] = [(head, head.waiting_since)]
        self.waitlist.remove(head, now)
        admitted = 0
        for _ in range(self.config.backfill):
            p = self.waitlist.peek(now)
            if p is None or not self._below_cap():
                break
            lane = self._lane_for(p, exclude=held)
            if lane is None:
                looked.append((p, p.waiting_since))
                self.waitlist.remove(p, now)
                continue
            self._take_waiting(p, lane, now)
            self.backfilled += 1
            admitted += 1
        for p, since in looked:
            self.waitlist.push(p, now, since)
        self._backfill_lane = held
        self._backfill_free = [ln.kv_free() for ln in self.lanes]
        return admitted

    def _lane_for(self, p: Program, exclude: int | None = None) -> int | None:
        """The lane `p` would be admitted to now, or None (it waits); never `exclude`
        (a lane held for a blocked head)."""
        cfg = self.config
        if not self._below_cap() or not self.lanes:
            return None
        bound = next((c.lane for c in p.pending_calls if c.lane is not None), None)
        if self._budgeted:
            if bound is not None:
                ok = bound != exclude and fits(self.lanes[bound], p.kv_tokens, cfg.residency)
                return bound if ok else None
            if self._place is not None:
                lane = self._place(p, self.lanes)
                return None if lane == exclude else lane
            return choose_lane(p, self.lanes, cfg.residency, exclude)
        if self.active_programs > 0:
            capacity = sum(lane.limit.value for lane in self.lanes)
            if self.queued_calls > cfg.backlog_factor * capacity:
                return None
        if bound is not None:
            return bound
        if p.home is not None:
            return p.home
        return self._place(p, self.lanes) if self._place else self._least_loaded(p)

    def _admit(self, p: Program, lane_i: int, now: float) -> None:
        # a run's service is charged to its tenant when it is admitted (what its tenant's
        # runs took on average, minus what it has had), then drawn down by its calls:
        # otherwise a tenant could get many long runs admitted before the first of them
        # had cost it anything
        t = p.tenant
        prepay = max(0.0, t.mean_program_s - p.attained_s - p.prepaid_s)
        if prepay:
            p.prepaid_s += prepay
            t.vtime += prepay / t.weight
            self._rekey(t)
        p.admitted = True
        self.active_programs += 1
        self._home(p, lane_i)
        self._reserve(p, lane_i)
        pending, p.pending_calls = p.pending_calls, []
        for call in pending:
            self._enqueue(call, p, now)

    def _least_loaded(self, p: Program) -> int:
        """The lane with the least work for its limit; ties go to the lane with the fewest
        of the tenant's programs (so each tenant spreads over lanes and its share can be
        enforced on every lane), then the fewest programs."""
        name = p.tenant.name
        return min(
            self.lanes,
            key=lambda ln: (
                (ln.in_flight + ln.queued) / max(ln.limit.value, 1e-9),
                ln.tenant_homed.get(name, 0),
                ln.homed_programs,
                ln.index,
            ),
        ).index

    def _home(self, p: Program, lane_i: int | None) -> None:
        """Count `p` as homed on `lane_i` (None: on no lane; its last home stays known as
        the lane where its cache is)."""
        name = p.tenant.name
        if p.counted_on is not None:
            old = self.lanes[p.counted_on]
            old.homed_programs -= 1
            old.tenant_homed[name] -= 1
        p.counted_on = lane_i
        if lane_i is not None:
            p.home = lane_i
            new = self.lanes[lane_i]
            new.homed_programs += 1
            new.tenant_homed[name] = new.tenant_homed.get(name, 0) + 1

    def _reserve(self, p: Program, lane_i: int) -> None:
        lane = self.lanes[lane_i]
        p.resident_on = lane_i
        lane.kv_reserved += p.kv_tokens
        lane.residents[p.program_id] = p

    def _unreserve(self, p: Program) -> None:
        if p.resident_on is not None:
            lane = self.lanes[p.resident_on]
            lane.kv_reserved -= p.kv_tokens
            del lane.residents[p.program_id]
            p.resident_on = None

    def set_working_set(self, program_id: str, tokens: int, now: float) -> list[Program]:
        """The program's KV working set is now `tokens` (measured by the caller: the
        context its next call sends, plus its answer). Returns the programs suspended
        because their lane overflowed."""
        p = self.programs.get(program_id)
        if p is None:
            return []
        tokens = max(0, int(tokens))
        old, p.kv_tokens = p.kv_tokens, tokens
        if p.resident_on is None:
            return []
        lane = self.lanes[p.resident_on]
        lane.kv_reserved += tokens - old
        if tokens > old and overflowing(lane, self.config.residency):
            return self._relieve(lane, now)
        if tokens < old:
            self.admit_waiting(now)
        return []

    def idle(self, program_id: str, now: float, expected_s: float, *, human: bool = False) -> bool:
        """The program's calls are done for now: it runs a tool predicted to take
        `expected_s`, or (`human=True`) waits for a person, which is unbounded: it is then
        suspended at once (nothing is held across a human wait). Returns whether it was
        suspended."""
        p = self.programs.get(program_id)
        if p is None:
            return False
        p.idle_until = now + max(0.0, expected_s)
        if human and p.admitted and not p.busy:
            self.suspend(program_id, now, "human_wait")
            return True
        return False

    def suspend(self, program_id: str, now: float, reason: str = "suspended") -> bool:
        """Take `program_id` off its lane: its KV reservation is released and its next
        call waits for admission again (calls already queued wait with it)."""
        p = self.programs.get(program_id)
        if p is None or not p.admitted:
            return False
        p.admitted = False
        self.active_programs -= 1
        self._unreserve(p)
        self._home(p, None)
        p.suspensions += 1
        self.suspensions[reason] = self.suspensions.get(reason, 0) + 1
        queued = [
            c for pq in p.queues.values() for _, c in pq.heap if c.state == QUEUED and c._pq is pq
        ]
        for c in dict.fromkeys(queued):
            self._unqueue(c)
            c.state = PENDING
            p.pending_calls.append(c)
        if self.on_suspend is not None:
            self.on_suspend(p, reason)
        if p.pending_calls:
            self._wait_for_admission(p, now)
        self.admit_waiting(now)
        return True

    def _relieve(self, lane: Lane, now: float) -> list[Program]:
        victims = choose_victims(lane, now, self.config.residency)
        for p in victims:
            self.suspend(p.program_id, now, "memory")
        return victims

    def close_program(self, program_id: str, now: float = 0.0) -> None:
        """The run finished: forget it (its queued calls, if any, are cancelled)."""
        self.cancel_program(program_id, now)

    def cancel_program(self, program_id: str, now: float = 0.0) -> list[Call]:
        """The run was cancelled: drop its queued calls and return them."""
        p = self.programs.pop(program_id, None)
        if p is None:
            return []
        t = p.tenant
        t.open_programs -= 1
        if p.prepaid_s:  # it took less than its tenant's runs usually do
            t.vtime -= p.prepaid_s / t.weight
            self._rekey(t)
        t.programs_done += 1
        t.mean_program_s += (p.attained_s - t.mean_program_s) / min(t.programs_done, 32)
        dropped: list[Call] = []
        for call in p.pending_calls:
            call.state = CANCELLED
            self.calls.pop(call.call_id, None)
            dropped.append(call)
        p.pending_calls = []
        for pq in p.queues.values():
            for _, call in pq.heap:
                if call.state == QUEUED and call._pq is pq:
                    self._unqueue(call)
                    call.state = CANCELLED
                    self.calls.pop(call.call_id, None)
                    dropped.append(call)
        if p.admitted:
            self.active_programs -= 1
            self._unreserve(p)
            self._home(p, None)
            p.admitted = False
        elif p.waiting_since is not None:
            self.waitlist.remove(p, now)
        self.admit_waiting(now)
        return dropped

    def add_lane(self, name: str, kv_budget: int | None = None) -> int:
        """Add a lane (e.g. a backend seen for the first time); returns its index."""
        lane = Lane(len(self.lanes), name, AIMDLimit(self.config.limits), kv_budget)
        self.lanes.append(lane)
        return lane.index

    def lane_index(self, name: str) -> int | None:
        for lane in self.lanes:
            if lane.name == name:
                return lane.index
        return None

    # -- calls ---------------------------------------------------------------------------

    def submit(
        self,
        call: Call,
        now: float = 0.0,
        *,
        tenant: str | None = None,
        kv_tokens: int | None = None,
    ) -> Call:
        """Queue a call; its program is opened (and admitted if possible) on first use,
        on the call's lane when it is bound to one. `kv_tokens`: the program's working set
        with this call (its prompt and answer), as `set_working_set`."""
        if call.call_id in self.calls:
            raise ValueError(f"call {call.call_id!r} is already queued")
        p = self.programs.get(call.program_id)
        if p is None:
            p = self._new_program(call.program_id, tenant, now, home=call.lane)
        call.seq = next(self._seq)
        call.enqueued_at = now
        call.priority = p.level
        self.calls[call.call_id] = call
        p.busy += 1
        if kv_tokens is not None:
            self.set_working_set(p.program_id, kv_tokens, now)
        if p.admitted:
            self._enqueue(call, p, now)
            return call
        call.state = PENDING
        p.pending_calls.append(call)
        if p.waiting_since is None:
            # new, or suspended: its call brings it to the admission queue
            self._queue_for_admission(p, now)
        return call

    def _enqueue(self, call: Call, p: Program, now: float) -> None:
        lane_i = call.lane if call.lane is not None else p.home
        assert lane_i is not None
        lane = self.lanes[lane_i]
        pq = p.queues.get(lane_i)
        if pq is None:
            pq = p.queues[lane_i] = ProgramQueue(p, lane_i)
        t = p.tenant
        tq = lane.tenant_queues.get(t.name)
        if tq is None:
            tq = lane.tenant_queues[t.name] = TenantQueue(t)
        call.state = QUEUED
        call._pq = pq
        heapq.heappush(pq.heap, (self._key(-call.remaining_cost_s, call.seq), call))
        heapq.heappush(lane.age_heap, (self._key(call.enqueued_at, call.seq), call))
        if pq.queued == 0:
            pq.version += 1
            heapq.heappush(tq.heap, (self._key(p.level, p.arrival, p.seq), pq, pq.version))
        pq.queued += 1
        if tq.queued == 0:
            heapq.heappush(
                lane.tenant_heap, (self._key(t.vtime, t.dispatched, tq.tenant.name), tq, t.version)
            )
        tq.queued += 1
        lane.queued += 1
        self.queued_calls += 1
        t.lanes_with_work.add(lane_i)

    def _unqueue(self, call: Call) -> None:
        """Account for a queued call leaving its queues (heap entries go stale lazily)."""
        pq = call._pq
        assert pq is not None
        lane = self.lanes[pq.lane]
        t = pq.program.tenant
        tq = lane.tenant_queues[t.name]
        pq.queued -= 1
        tq.queued -= 1
        lane.queued -= 1
        self.queued_calls -= 1
        if tq.queued == 0:
            t.lanes_with_work.discard(pq.lane)

    def cancel_call(self, call: Call | str) -> bool:
        """Withdraw a call that has not been dispatched (its caller gave up waiting).
        Returns False when it was already dispatched or unknown."""
        c = self.calls.get(call if isinstance(call, str) else call.call_id)
        if c is None:
            return False
        if c.state == QUEUED:
            self._unqueue(c)
        elif c.state == PENDING:
            p = self.programs.get(c.program_id)
            if p is not None and c in p.pending_calls:
                p.pending_calls.remove(c)
        else:
            return False
        c.state = CANCELLED
        del self.calls[c.call_id]
        p = self.programs.get(c.program_id)
        if p is not None:
            p.busy -= 1
        return True

    # -- choosing ------------------------------------------------------------------------

    def _peek(self, lane: Lane, now: float) -> Call | None:
        """The call `lane` would run next, without taking it."""
        if lane.queued == 0:
            return None
        age = lane.age_heap
        # entries go stale when their call left the queue or moved to another lane
        while age and (age[0][1].state != QUEUED or age[0][1].queued_on != lane.index):
            heapq.heappop(age)
        if age and now - age[0][1].enqueued_at >= self.config.starvation_s:
            return age[0][1]
        th = lane.tenant_heap
        # every (lane, tenant version) with queued calls was pushed once: stale entries go
        while th[0][1].queued == 0 or th[0][2] != th[0][1].tenant.version:
            heapq.heappop(th)
        tq = th[0][1]
        ph = tq.heap
        while ph[0][1].queued == 0 or ph[0][2] != ph[0][1].version:
            heapq.heappop(ph)
        pq = ph[0][1]
        ch = pq.heap
        while ch[0][1].state != QUEUED or ch[0][1]._pq is not pq:
            heapq.heappop(ch)
        return ch[0][1]

    def _take(self, call: Call, lane: Lane, now: float) -> None:
        pq = call._pq
        assert pq is not None
        p = pq.program
        t = p.tenant
        if now - call.enqueued_at >= self.config.starvation_s:
            self.starvation_promotions += 1
        self._unqueue(call)
        call.state = DISPATCHED
        call.dispatched_at = now
        call.assigned = lane.index
        call.priority = p.level
        lane.in_flight += 1
        # start-time fair queueing: the system's virtual time is the dispatched tenant's
        self.vtime = max(self.vtime, t.vtime)
        paid = min(call.est_service_s, p.prepaid_s)
        p.prepaid_s -= paid
        t.vtime += (call.est_service_s - paid) / t.weight
        t.dispatched += 1
        self._rekey(t)

    def next_for(self, lane_index: int, now: float) -> Call | None:
        """Take the next call for a lane with room (None: nothing queued or no room)."""
        lane = self.lanes[lane_index]
        if not lane.has_room:
            return None
        call = self._peek(lane, now)
        if call is None:
            return None
        self._take(call, lane, now)
        return call

    def dispatch(self, now: float) -> list[Call]:
        """Every call that may go now: admit runs, fill each lane up to its limit, let
        idle lanes take homed calls that wait on full ones. Returns them in order."""
        self.admit_waiting(now)
        out: list[Call] = []
        for lane in self.lanes:
            while (call := self.next_for(lane.index, now)) is not None:
                out.append(call)
        if self.queued_calls and len(self.lanes) > 1:
            out.extend(self._steal(now))
        return out

    def _steal(self, now: float) -> list[Call]:
        out: list[Call] = []
        idle = [ln for ln in self.lanes if ln.has_room and ln.queued == 0]
        for dst in idle:
            while dst.has_room:
                src = max(self.lanes, key=lambda ln: (ln.queued, -ln.index))
                if src.queued == 0 or src is dst:
                    break
                call = self._peek(src, now)
                if call is None or call.lane is not None:
                    break  # nothing queued, or a call bound to its lane (e.g. another model)
                if not self._steal_ok(call, src, dst, now):
                    break
                self._take(call, dst, now)
                call.stolen = True
                self.steals += 1
                p = self.programs.get(call.program_id)
                if p is not None and p.home == src.index:
                    # the program moves: its context is rebuilt on the new lane anyway
                    self._home(p, dst.index)
                    if p.resident_on is not None:
                        self._unreserve(p)
                        self._reserve(p, dst.index)
                    self._rehome_queued(p, src.index, dst.index, now)
                out.append(call)
        return out

    def _steal_ok(self, call: Call, src: Lane, dst: Lane, now: float) -> bool:
        if self._can_steal is not None:
            return self._can_steal(call, src, dst, now)
        return now - call.enqueued_at >= self.config.steal_after_s

    def _rehome_queued(self, p: Program, src: int, dst: int, now: float) -> None:
        pq = p.queues.get(src)
        if pq is None or pq.queued == 0:
            return
        # only calls that follow their program's home move (not ones bound to this lane);
        # a call may sit in a heap twice (re-queued), so collect each once
        moving = list(
            {
                id(c): c for _, c in pq.heap if c.state == QUEUED and c._pq is pq and c.lane is None
            }.values()
        )
        for c in moving:
            self._unqueue(c)
            c.state = PENDING
        for c in moving:
            self._enqueue(c, p, now)

    # -- completion ----------------------------------------------------------------------

    def complete(
        self,
        call: Call | str,
        now: float,
        *,
        service_s: float | None = None,
        congested: bool | None = None,
    ) -> None:
        """A dispatched call finished (or failed). `service_s` is the GPU time it took
        (defaults to its estimate); `congested` feeds the lane's limit (None: no signal)."""
        c = self.calls.pop(call if isinstance(call, str) else call.call_id, None)
        if c is None:
            return
        dispatched = c.state == DISPATCHED
        if c.state == QUEUED:
            self._unqueue(c)
        c.state = DONE
        p = self.programs.get(c.program_id)
        if p is not None:
            p.busy -= 1
        if not dispatched:
            return
        assert c.assigned is not None
        lane = self.lanes[c.assigned]
        lane.in_flight -= 1
        if congested is not None:
            lane.limit.observe(congested=congested, in_flight=lane.in_flight + 1, now=now)
        actual = c.est_service_s if service_s is None else max(0.0, service_s)
        if p is None:
            return
        t = p.tenant
        t.service_s += actual
        if actual != c.est_service_s:
            t.vtime += (actual - c.est_service_s) / t.weight
            self._rekey(t)
        p.attained_s += actual
        level = self.level_of(p.attained_s)
        if level != p.level:
            p.level = level
            for lane_i, pq in p.queues.items():
                if pq.queued > 0:
                    pq.version += 1
                    tq = self.lanes[lane_i].tenant_queues[t.name]
                    heapq.heappush(tq.heap, (self._key(p.level, p.arrival, p.seq), pq, pq.version))

    # -- views ---------------------------------------------------------------------------

    def pin_pressure(self, program_id: str, measured: float) -> float:
        """The memory pressure a pin of `program_id` should be priced at: none while the
        program is resident on a lane with a KV budget (its memory is reserved already),
        else what the backend measures."""
        p = self.programs.get(program_id)
        lane = None if p is None or p.resident_on is None else self.lanes[p.resident_on]
        return 0.0 if lane is not None and lane.kv_budget is not None else measured

    def priority_of(self, program_id: str) -> int:
        """The backend priority (lower first) for the program's next call."""
        p = self.programs.get(program_id)
        return 0 if p is None else p.level
