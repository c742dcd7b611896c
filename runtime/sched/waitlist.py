"""The programs waiting for admission, in the order the scheduler admits them: tenants take
turns by virtual time (their weighted service: fair share), within a tenant least attained
service first (the program's PLAS level), then arrival; and a program that has waited
`starvation_s` goes first whatever its tenant or level.

Heaps with lazy deletion, O(log n) per operation: one heap of waiting programs per tenant,
one heap of tenants keyed by (virtual time, their best program's key) with one live entry
per tenant (`Tenant.admit_token`), and one heap of every waiting program by the time it
started waiting. A program's entries carry its `admit_version`; admitting or dropping it
bumps the version, so they go stale and are dropped when they surface.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from treadle.runtime.sched.entities import Program, Tenant

KeyMaker = Callable[..., Any]


class AdmissionQueue:
    """Programs waiting for admission (module docstring)."""

    def __init__(self, key: KeyMaker, starvation_s: float):
        #: builds heap keys (the scheduler's, which can count comparisons)
        self._key = key
        self.starvation_s = starvation_s
        self._tenants: list[tuple[Any, Tenant, int]] = []
        self._age: list[tuple[Any, Program, int]] = []
        self.count = 0

    def push(self, p: Program, now: float) -> None:
        t = p.tenant
        p.admit_version += 1
        p.waiting_since = now
        heapq.heappush(t.waiting, (self._key(p.level, p.arrival, p.seq), p, p.admit_version))
        t.n_waiting += 1
        self.count += 1
        heapq.heappush(self._age, (self._key(now, p.seq), p, p.admit_version))
        if self._head(t) is p:  # a new head re-keys its tenant; otherwise its entry holds
            self._push_tenant(t)

    def remove(self, p: Program) -> None:
        """`p` is admitted or gone: its entries go stale."""
        p.admit_version += 1
        p.waiting_since = None
        t = p.tenant
        t.n_waiting -= 1
        self.count -= 1
        if t.n_waiting:
            self._push_tenant(t)

    def starved(self, p: Program, now: float) -> bool:
        return p.waiting_since is not None and now - p.waiting_since >= self.starvation_s

    def peek(self, now: float) -> Program | None:
        """The program to consider next: one that has waited `starvation_s`, else the
        head of the tenant with the lowest virtual time."""
        age = self._age
        while age and age[0][2] != age[0][1].admit_version:
            heapq.heappop(age)
        if age and self.starved(age[0][1], now):
            return age[0][1]
        heap = self._tenants
        while heap:
            _, t, token = heap[0]
            head = self._head(t) if token == t.admit_token else None
            if head is None:
                heapq.heappop(heap)
                continue
            if heap[0][0] != self._tenant_key(t, head):
                self._push_tenant(t)  # its virtual time or head moved since: re-key
                continue
            return head
        return None

    def _head(self, t: Tenant) -> Program | None:
        heap = t.waiting
        while heap and heap[0][2] != heap[0][1].admit_version:
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def _tenant_key(self, t: Tenant, p: Program) -> Any:
        return self._key(t.vtime, p.level, p.arrival, p.seq)

    def _push_tenant(self, t: Tenant) -> None:
        head = self._head(t)
        if head is None:
            return
        t.admit_token += 1
        heapq.heappush(self._tenants, (self._tenant_key(t, head), t, t.admit_token))
