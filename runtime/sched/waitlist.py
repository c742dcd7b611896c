"""The programs waiting for admission, in the order the scheduler admits them: tenants take
turns by virtual time (their weighted service: fair share); within a tenant, least attained
service first (the program's PLAS level), then arrival, except that a program of the
tenant that has waited `starvation_s` goes first (so a long program is not starved by a
stream of short ones of its own tenant; across tenants, fair share already guarantees each
its turn, and an age rule there would turn overload into first-come-first-served).

Heaps with lazy deletion, O(log n) per operation: per tenant, one heap of its waiting
programs by (level, arrival) and one by the time they started waiting; and one heap of
tenants keyed by (virtual time, their next program's key), with one live entry per tenant
(`Tenant.admit_token`). A program's entries carry its `admit_version`; admitting or
dropping it bumps the version, so they go stale and are dropped when they surface.
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
        self.count = 0

    def push(self, p: Program, now: float, since: float | None = None) -> None:
        """`p` waits from now (or from `since`: it was only taken out to look behind it,
        and keeps its place and its age)."""
        t = p.tenant
        p.admit_version += 1
        p.waiting_since = now if since is None else since
        heapq.heappush(t.waiting, (self._key(p.level, p.arrival, p.seq), p, p.admit_version))
        heapq.heappush(t.aged, (self._key(p.waiting_since, p.seq), p, p.admit_version))
        t.n_waiting += 1
        self.count += 1
        if t.n_waiting == 1 or self._head(t, now) is p:  # a new head re-keys its tenant
            self._push_tenant(t, now)

    def remove(self, p: Program, now: float) -> None:
        """`p` is admitted or gone: its entries go stale."""
        p.admit_version += 1
        p.waiting_since = None
        t = p.tenant
        t.n_waiting -= 1
        self.count -= 1
        if t.n_waiting:
            self._push_tenant(t, now)

    def starved(self, p: Program, now: float) -> bool:
        return p.waiting_since is not None and now - p.waiting_since >= self.starvation_s

    def peek(self, now: float) -> Program | None:
        """The head of the tenant with the lowest virtual time."""
        heap = self._tenants
        while heap:
            _, t, token = heap[0]
            head = self._head(t, now) if token == t.admit_token else None
            if head is None:
                heapq.heappop(heap)
                continue
            if heap[0][0] != self._tenant_key(t, head, now):
                self._push_tenant(t, now)  # its virtual time or head moved since: re-key
                continue
            return head
        return None

    def _head(self, t: Tenant, now: float) -> Program | None:
        """The tenant's next program: its longest-waiting one once that has starved, else
        least attained service, then arrival."""
        for heap in (t.aged, t.waiting):
            while heap and heap[0][2] != heap[0][1].admit_version:
                heapq.heappop(heap)
        if t.aged and self.starved(t.aged[0][1], now):
            return t.aged[0][1]
        return t.waiting[0][1] if t.waiting else None

    def _tenant_key(self, t: Tenant, p: Program, now: float) -> Any:
        level = -1 if self.starved(p, now) else p.level
        return self._key(t.vtime, level, p.arrival, p.seq)

    def _push_tenant(self, t: Tenant, now: float) -> None:
        head = self._head(t, now)
        if head is None:
            return
        t.admit_token += 1
        heapq.heappush(self._tenants, (self._tenant_key(t, head, now), t, t.admit_token))
