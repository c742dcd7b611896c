"""Clocks that drive the simulator: virtual time for benchmarks, real time for the server.

An engine (and anything else in a simulation: a router, a workload generator, tool calls)
only ever asks a clock two things: what time it is, and to call something back at a time.
The same engine code therefore runs in either mode.

- `VirtualClock`: a discrete-event loop. Callbacks run in time order (ties in the order
  they were scheduled); time jumps from one event to the next, so an hour of traffic
  simulates in seconds. Several engines, a router and workload generators share one
  `VirtualClock` in one simulation. Single-threaded; callbacks may schedule more events.
- `RealTimeClock`: maps virtual seconds onto the running asyncio loop's wall clock
  (`speed` virtual seconds per wall second) for `treadle sim serve` and `SimBackend`.

Public API (stable):

    clock.now() -> float                         # seconds, virtual
    clock.schedule(at, callback) -> Timer        # run `callback()` at virtual time `at`
    clock.call_later(delay, callback) -> Timer
    timer.cancel()
    VirtualClock(start=0.0).run_until(t=None) -> int   # events run; None = until idle
    VirtualClock.run() -> int;  .pending;  .peek_time() -> float | None
    RealTimeClock(speed=1.0, on_error=None)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What an engine needs from time."""

    def now(self) -> float: ...

    def schedule(self, at: float, callback: Callback) -> Timer: ...

    def call_later(self, delay: float, callback: Callback) -> Timer: ...


class VirtualTimer:
    __slots__ = ("at", "callback", "cancelled")

    def __init__(self, at: float, callback: Callback):
        self.at = at
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """A discrete-event loop in virtual seconds (see the module docstring)."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)
        self._heap: list[tuple[float, int, VirtualTimer]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def now(self) -> float:
        return self._now

    def schedule(self, at: float, callback: Callback) -> VirtualTimer:
        """Call `callback` at `at`; a time in the past runs at the current time."""
        at = max(at, self._now)
        timer = VirtualTimer(at, callback)
        heapq.heappush(self._heap, (at, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> VirtualTimer:
        return self.schedule(self._now + max(0.0, delay), callback)

    @property
    def pending(self) -> int:
        """Events scheduled and not cancelled."""
        return sum(1 for _, _, t in self._heap if not t.cancelled)

    def peek_time(self) -> float | None:
        """When the next live event fires, or None when there is none."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run_until(self, until: float | None = None) -> int:
        """Run events up to and including time `until` (all of them when None).

        With `until`, the clock ends at `until` even if the last event came earlier.
        Returns how many callbacks ran. Exceptions from callbacks propagate.
        """
        heap = self._heap
        pop = heapq.heappop
        ran = 0
        while heap:
            at, _, timer = heap[0]
            if until is not None and at > until:
                break
            pop(heap)
            if timer.cancelled:
                continue
            self._now = at
            timer.cancelled = True  # a fired timer cannot be cancelled into a no-op later
            timer.callback()
            ran += 1
        if until is not None and until > self._now:
            self._now = until
        self.events_run += ran
        return ran

    def run(self) -> int:
        return self.run_until(None)


class RealTimeClock:
    """Virtual time = `speed` x wall seconds since creation, on the running asyncio loop.

    Callbacks run on the event loop. An exception in one is logged and handed to
    `on_error` (the owner fails what depends on it) rather than lost in the loop's log.
    """

    def __init__(
        self, speed: float = 1.0, *, on_error: Callable[[BaseException], None] | None = None
    ):
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self.on_error = on_error
        self._t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    def schedule(self, at: float, callback: Callback) -> asyncio.TimerHandle:
        return self.call_later(at - self.now(), callback)

    def call_later(self, delay: float, callback: Callback) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, delay) / self.speed, self._guard, callback)

    def _guard(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:
            log.exception("simulator callback failed")
            if self.on_error is not None:
                self.on_error(exc)
            else:
                raise
