"""The waiting queue of one simulated engine, in the order of its scheduling policy.

- `fcfs`: arrival order (vLLM's default).
- `priority`: lower `SimRequest.priority` first, then arrival (vLLM's priority policy).
- `program` (vllm-continuum's `ContinuumRequestQueue`): a request whose program holds a
  pin goes first; then requests by the *first* arrival of their program ("job-level
  FCFS"); then by their own arrival.

Heaps with lazy deletion: an entry carries the request's wait epoch (bumped each time it
is queued again after a preemption) and is dropped when it surfaces stale. The queue also
counts each program's waiting requests, which the pin rules read ("hold a pin while the
program's next request waits").
"""

from __future__ import annotations

import heapq
from collections.abc import Container

from treadle.backends.sim.config import SchedulingPolicy
from treadle.backends.sim.request import WAITING, SimRequest

_Entry = tuple[tuple[float, ...], int, int, SimRequest]


class WaitQueue:
    """Requests waiting for a seat, memory or token budget (module docstring)."""

    def __init__(self, policy: SchedulingPolicy, pinned: Container[str]):
        self.policy = policy
        #: the programs that hold a pin now (the engine's pin table)
        self._pinned = pinned
        self._heap: list[_Entry] = []
        self._pinned_heap: list[_Entry] = []
        self._by_program: dict[str, set[SimRequest]] = {}
        self._program_first: dict[str, float] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def sort_key(self, r: SimRequest, now: float) -> tuple[float, ...]:
        """The request's order key under the policy (set once, when it arrives)."""
        if self.policy == "fcfs":
            return (now,)
        if self.policy == "priority":
            return (float(r.priority), now)
        pid = r.program_id
        first = self._program_first.setdefault(pid, now) if pid is not None else now
        return (first, now)

    def push(self, r: SimRequest) -> None:
        r.state = WAITING
        r._wait_epoch += 1
        entry = (r._sort_key, r._seq, r._wait_epoch, r)
        heapq.heappush(self._heap, entry)
        self.count += 1
        pid = r.program_id
        if pid is not None:
            self._by_program.setdefault(pid, set()).add(r)
            if self.policy == "program" and pid in self._pinned:
                heapq.heappush(self._pinned_heap, entry)

    def peek(self) -> SimRequest | None:
        if self.policy == "program":
            ph = self._pinned_heap
            while ph:
                _, _, epoch, r = ph[0]
                if r.state != WAITING or r._wait_epoch != epoch or r.program_id not in self._pinned:
                    heapq.heappop(ph)
                    continue
                return r
        heap = self._heap
        while heap:
            _, _, epoch, r = heap[0]
            if r.state != WAITING or r._wait_epoch != epoch:
                heapq.heappop(heap)
                continue
            return r
        return None

    def take(self, r: SimRequest) -> None:
        """`r` leaves the queue (scheduled or aborted); its entries go stale."""
        self.count -= 1
        pid = r.program_id
        if pid is not None:
            waiting = self._by_program[pid]
            waiting.discard(r)
            if not waiting:
                del self._by_program[pid]

    def has_program(self, program_id: str) -> bool:
        """Whether a request of `program_id` waits here."""
        return program_id in self._by_program

    def program_pinned(self, program_id: str) -> None:
        """`program_id` now holds a pin: under `program`, its waiting requests go first."""
        if self.policy != "program":
            return
        for w in self._by_program.get(program_id, ()):
            heapq.heappush(self._pinned_heap, (w._sort_key, w._seq, w._wait_epoch, w))
