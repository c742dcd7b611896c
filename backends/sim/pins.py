"""The pins in force on one simulated engine: KV blocks a finished request holds for its
program's next request, for at most a time-to-live.

`PinTable` keeps the pins by program, their deadline timers and counters; the engine
decides when to set and release them (its module docstring states the rules). At the
deadline the table asks the engine (`holds(program)`) whether a request of the program
waits there: if so the pin is *overdue* and held until `waiting_left(program)` says the
last one left the queue (vllm-continuum's `unpin_requests_regular`); otherwise it goes.
Every release calls `on_release`, so the engine can use the freed blocks at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from treadle.backends.sim.clock import Clock, Timer
from treadle.backends.sim.kvcache import BlockCache, CacheEntry


class Pin:
    """One pin: `entries` of the block cache held under `key` until `deadline`."""

    __slots__ = ("active", "deadline", "entries", "key", "timer")

    def __init__(self, key: str, entries: list[CacheEntry], deadline: float):
        self.key = key
        self.entries = entries
        self.deadline = deadline
        self.active = True
        self.timer: Timer | None = None


class PinTable:
    """The pins of one engine (module docstring)."""

    def __init__(
        self,
        cache: BlockCache,
        clock: Clock,
        *,
        max_fraction: float,
        holds: Callable[[str], bool],
        on_release: Callable[[], None],
    ):
        self.cache = cache
        self.clock = clock
        self.max_fraction = max_fraction
        self._holds = holds
        self._on_release = on_release
        self._by_key: dict[str, list[Pin]] = {}
        #: pins past their deadline, held while a request of their program waits
        self._overdue: dict[str, list[Pin]] = {}
        self.active = 0
        self.set_count = 0
        self.released = 0
        self.expired = 0
        self.refused = 0

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[Pin]:
        for pins in self._by_key.values():
            yield from pins

    def programs(self) -> list[str]:
        return list(self._by_key)

    def pin(self, key: str, entries: list[CacheEntry], ttl_s: float) -> Pin | None:
        """Pin `entries` for `ttl_s` under `key`; None when the pinned-blocks cap refuses."""
        cache = self.cache
        added = cache.newly_pinned_blocks(entries)
        if cache.pinned_blocks + added > self.max_fraction * cache.total:
            self.refused += 1
            return None
        cache.pin(entries)
        pin = Pin(key, entries, self.clock.now() + ttl_s)
        pin.timer = self.clock.schedule(pin.deadline, lambda: self._deadline(pin))
        self._by_key.setdefault(key, []).append(pin)
        self.set_count += 1
        self.active += 1
        return pin

    def _deadline(self, pin: Pin) -> None:
        pin.timer = None
        if self._holds(pin.key):
            self._overdue.setdefault(pin.key, []).append(pin)
        else:
            self.release(pin, "expired")

    def waiting_left(self, key: str) -> None:
        """No request of `key` waits any more: its overdue pins go."""
        for pin in self._overdue.pop(key, ()):
            self.release(pin, "expired")

    def release_program(self, key: str, reason: str) -> int:
        pins = list(self._by_key.get(key, ()))
        for pin in pins:
            self.release(pin, reason)
        return len(pins)

    def release(self, pin: Pin, reason: str) -> None:
        if not pin.active:
            return
        pin.active = False
        if pin.timer is not None:
            pin.timer.cancel()
        self.cache.unpin(pin.entries)
        pins = self._by_key[pin.key]
        pins.remove(pin)
        if not pins:
            del self._by_key[pin.key]
        overdue = self._overdue.get(pin.key)
        if overdue is not None and pin in overdue:
            overdue.remove(pin)
            if not overdue:
                del self._overdue[pin.key]
        self.active -= 1
        self.released += 1
        if reason == "expired":
            self.expired += 1
        self._on_release()
