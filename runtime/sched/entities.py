"""What the scheduler core works on: calls, programs (runs), tenants and lanes (replicas or
backends), and the per-lane queues that order them. Plain data; `scheduler.py` holds the
policy that moves them.

A `Call` is one LLM call; the caller fills its first fields and the scheduler the rest. A
`Program` is one run: the unit of admission, fair share and least-attained service, and
of KV residency (`Lane.residents`). A `Tenant` has a weight and a virtual time (its
weighted service). A `Lane` has an in-flight limit, a KV budget (tokens; None when
unknown) and, per tenant and program, heaps of queued calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treadle.runtime.sched.limits import AIMDLimit

QUEUED, DISPATCHED, DONE, CANCELLED, PENDING = (
    "queued",
    "dispatched",
    "done",
    "cancelled",
    "pending",
)


class Counted:
    """A heap key that counts its comparisons (for the O(log n) test)."""

    __slots__ = ("counter", "key")

    def __init__(self, key: tuple[Any, ...], counter: list[int]):
        self.key = key
        self.counter = counter

    def __lt__(self, other: Counted) -> bool:
        self.counter[0] += 1
        return self.key < other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Counted) and self.key == other.key

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=False, slots=True)
class Call:
    """One LLM call as the scheduler sees it. The caller fills the first fields; the
    scheduler sets `state`, `assigned`, `priority`, `dispatched_at`."""

    call_id: str
    program_id: str
    #: estimated GPU seconds of the call (charged to the tenant at dispatch)
    est_service_s: float = 0.0
    #: estimated work (seconds) from this call to the end of its program
    remaining_cost_s: float = 0.0
    #: the lane it must go to (None: its program's home lane, which it may be stolen from)
    lane: int | None = None
    #: the lane it was dispatched to
    assigned: int | None = None
    #: anything the caller wants back (a request, a future)
    payload: Any = None
    state: str = PENDING
    priority: int = 0
    enqueued_at: float = 0.0
    dispatched_at: float | None = None
    seq: int = 0
    stolen: bool = False
    _pq: ProgramQueue | None = None

    @property
    def queued_on(self) -> int:
        """The lane whose queue holds it (-1: none)."""
        return -1 if self._pq is None else self._pq.lane


@dataclass(eq=False, slots=True)
class Tenant:
    name: str
    weight: float = 1.0
    #: virtual time: weighted service received (the tenant heap's key)
    vtime: float = 0.0
    version: int = 0
    service_s: float = 0.0
    dispatched: int = 0
    lanes_with_work: set[int] = field(default_factory=set)
    #: runs open (admitted or waiting): a tenant with none is idle
    open_programs: int = 0
    #: service its runs took (a moving mean over the last ~32): charged at admission
    mean_program_s: float = 0.0
    programs_done: int = 0
    #: programs waiting for admission: heap of (key, program, admission version)
    waiting: list[tuple[Any, Program, int]] = field(default_factory=list)
    #: the same programs by the time they started waiting (anti-starvation)
    aged: list[tuple[Any, Program, int]] = field(default_factory=list)
    n_waiting: int = 0
    admit_token: int = 0


@dataclass(eq=False, slots=True)
class Program:
    program_id: str
    tenant: Tenant
    arrival: float
    seq: int
    home: int | None = None
    admitted: bool = False
    attained_s: float = 0.0
    #: service charged to its tenant at admission and not yet drawn down by its calls
    prepaid_s: float = 0.0
    level: int = 0
    pending_calls: list[Call] = field(default_factory=list)
    queues: dict[int, ProgramQueue] = field(default_factory=dict)
    #: caller data
    info: dict[str, Any] = field(default_factory=dict)
    #: the lane whose homed-program counts include this program
    counted_on: int | None = None
    #: KV tokens the program needs resident (its working set, set by the caller)
    kv_tokens: int = 0
    #: the lane holding its KV reservation (None: not resident)
    resident_on: int | None = None
    #: calls queued or in flight (a resident program with none is idle: in a tool)
    busy: int = 0
    #: when its current idle spell is expected to end (a tool's predicted end)
    idle_until: float = 0.0
    #: waiting for admission: since when, and the version that keeps heap entries live
    waiting_since: float | None = None
    admit_version: int = 0
    suspensions: int = 0


@dataclass(eq=False, slots=True)
class TenantQueue:
    """A tenant's programs with queued calls on one lane."""

    tenant: Tenant
    heap: list[tuple[Any, ProgramQueue, int]] = field(default_factory=list)
    queued: int = 0


@dataclass(eq=False, slots=True)
class ProgramQueue:
    """A program's queued calls on one lane, critical path first."""

    program: Program
    lane: int
    heap: list[tuple[Any, Call]] = field(default_factory=list)
    queued: int = 0
    version: int = 0


class Lane:
    """One replica or backend: its in-flight count, limit, KV budget and queues."""

    def __init__(self, index: int, name: str, limit: AIMDLimit, kv_budget: int | None = None):
        self.index = index
        self.name = name
        self.limit = limit
        self.in_flight = 0
        self.queued = 0
        self.tenant_heap: list[tuple[Any, TenantQueue, int]] = []
        self.tenant_queues: dict[str, TenantQueue] = {}
        self.age_heap: list[tuple[Any, Call]] = []
        self.homed_programs = 0
        self.tenant_homed: dict[str, int] = {}
        #: KV tokens the lane holds for resident programs (None: unknown, not enforced)
        self.kv_budget = kv_budget
        self.kv_reserved = 0
        self.residents: dict[str, Program] = {}

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.limit.value

    def kv_free(self) -> float:
        """KV tokens not reserved by residents (infinite when the budget is unknown)."""
        if self.kv_budget is None:
            return float("inf")
        return float(self.kv_budget - self.kv_reserved)

    def __repr__(self) -> str:
        return (
            f"Lane({self.name}, in_flight={self.in_flight}, limit={self.limit.value:.1f}, "
            f"queued={self.queued}, kv={self.kv_reserved}/{self.kv_budget})"
        )


Placer = Callable[[Program, list[Lane]], int]
StealCheck = Callable[[Call, Lane, Lane, float], bool]
SuspendListener = Callable[[Program, str], None]
