"""The KV block pool of one replica: cached extents, reference counts, LRU eviction.

Memory is counted in blocks (16 tokens by default), in three kinds:

- **cached**: blocks of an extent (see `blocks.py`) registered under its chained hash.
  An entry's `refs` counts the running requests that use it plus the pins that hold it.
  Entries with no references are *evictable* and sit in an LRU queue: a request that ends
  (or is preempted) frees its entries tail-first, so the end of a sequence is evicted
  before its beginning (vLLM's free-block queue order).
- **private**: blocks a request owns that are not (yet) a cached extent: the partial last
  block, blocks whose content has no identity, and extents still being computed.
- **free**: `total - cached - private`. Allocation takes free blocks and evicts LRU
  entries when there are not enough; `available = free + evictable` is the most that can
  be allocated without preempting anyone or releasing a pin.

A pin is a reference too (`pins` counts them, `pinned_blocks` sums the blocks that hold
at least one pin), so pinned blocks are never evictable. Whether and when pins give way
under pressure is the engine's policy, not the pool's.

Public API (used by `engine.py`; stable): `BlockCache(total_blocks)`, `.match(keys, ends,
limit_blocks)`, `.probe(...)`, `.acquire(entries)`, `.release(entries)`, `.allocate(n)`,
`.free_private(n)`, `.register(key, n_blocks)`, `.pin(entries)`, `.unpin(entries)`, and the
counters `total`, `cached`, `private`, `evictable`, `pinned_blocks`, `free`, `available`,
`used` (blocks referenced or private: vLLM's KV usage), `evicted_blocks`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from treadle.errors import BackendError


class CacheEntry:
    """One cached extent: `nblocks` blocks under the chained hash `key`."""

    __slots__ = ("key", "nblocks", "pins", "refs")

    def __init__(self, key: int, nblocks: int):
        self.key = key
        self.nblocks = nblocks
        self.refs = 0
        self.pins = 0

    def __repr__(self) -> str:
        return f"CacheEntry({self.key:#x}, blocks={self.nblocks}, refs={self.refs})"


class OutOfBlocks(BackendError, RuntimeError):
    """An allocation asked for more than `available`; a bug in the caller's accounting."""


class BlockCache:
    """Block accounting and the prefix cache of one replica (module docstring)."""

    def __init__(self, total_blocks: int):
        if total_blocks < 1:
            raise ValueError("total_blocks must be >= 1")
        self.total = total_blocks
        self.entries: dict[int, CacheEntry] = {}
        self.lru: OrderedDict[int, CacheEntry] = OrderedDict()
        self.cached = 0
        self.private = 0
        self.evictable = 0
        self.pinned_blocks = 0
        self.evicted_blocks = 0

    @property
    def free(self) -> int:
        return self.total - self.cached - self.private

    @property
    def available(self) -> int:
        return self.total - self.cached - self.private + self.evictable

    @property
    def used(self) -> int:
        """Blocks that cannot be reused now: referenced (incl. pinned) or private."""
        return self.total - self.available

    # -- lookup ----------------------------------------------------------------------------

    def match(
        self, keys: Sequence[int], ends: Sequence[int], limit_blocks: int
    ) -> tuple[list[CacheEntry], int]:
        """The longest chain of cached extents that ends within `limit_blocks` blocks:
        (entries, blocks they cover). Changes nothing."""
        entries = self.entries
        out: list[CacheEntry] = []
        blocks = 0
        for key, end in zip(keys, ends, strict=False):
            if end > limit_blocks:
                break
            entry = entries.get(key)
            if entry is None:
                break
            out.append(entry)
            blocks = end
        return out, blocks

    def probe(self, keys: Sequence[int], ends: Sequence[int], limit_blocks: int) -> int:
        """Blocks of the longest cached prefix (for routers; changes nothing)."""
        return self.match(keys, ends, limit_blocks)[1]

    @staticmethod
    def evictable_in(entries: Sequence[CacheEntry]) -> int:
        """Blocks among `entries` that are currently evictable (acquiring them uses them)."""
        return sum(e.nblocks for e in entries if e.refs == 0)

    # -- references ------------------------------------------------------------------------

    def acquire(self, entries: Sequence[CacheEntry]) -> None:
        lru = self.lru
        for e in entries:
            if e.refs == 0:
                del lru[e.key]
                self.evictable -= e.nblocks
            e.refs += 1

    def release(self, entries: Sequence[CacheEntry]) -> None:
        """Drop one reference from each entry; unreferenced ones become evictable, the
        last entry first (so it is evicted first)."""
        lru = self.lru
        for e in reversed(entries):
            e.refs -= 1
            if e.refs == 0:
                lru[e.key] = e
                self.evictable += e.nblocks
            elif e.refs < 0:
                raise AssertionError(f"{e!r} released more often than acquired")

    def pin(self, entries: Sequence[CacheEntry]) -> None:
        """Add a pin (a reference that is not a request) to each entry."""
        self.acquire(entries)
        for e in entries:
            if e.pins == 0:
                self.pinned_blocks += e.nblocks
            e.pins += 1

    def unpin(self, entries: Sequence[CacheEntry]) -> None:
        for e in entries:
            e.pins -= 1
            if e.pins == 0:
                self.pinned_blocks -= e.nblocks
        self.release(entries)

    def newly_pinned_blocks(self, entries: Sequence[CacheEntry]) -> int:
        """Blocks that pinning `entries` would add to `pinned_blocks`."""
        return sum(e.nblocks for e in entries if e.pins == 0)

    # -- allocation ------------------------------------------------------------------------

    def allocate(self, n: int) -> None:
        """Take `n` private blocks, evicting LRU entries as needed."""
        if n <= 0:
            return
        if n > self.available:
            raise OutOfBlocks(f"asked for {n} blocks, {self.available} available")
        lru = self.lru
        entries = self.entries
        while self.total - self.cached - self.private < n:
            key, e = lru.popitem(last=False)
            del entries[key]
            self.cached -= e.nblocks
            self.evictable -= e.nblocks
            self.evicted_blocks += e.nblocks
        self.private += n

    def free_private(self, n: int) -> None:
        self.private -= n
        if self.private < 0:
            raise AssertionError("freed more private blocks than were allocated")

    def register(self, key: int, nblocks: int) -> CacheEntry:
        """Turn `nblocks` private blocks (a just-computed extent) into the cached entry
        `key`, referenced once by the caller. When `key` is already cached (another request
        computed it meanwhile) the caller shares that entry and the duplicate is freed."""
        entry = self.entries.get(key)
        self.private -= nblocks
        if entry is not None:
            self.acquire((entry,))
            return entry
        entry = CacheEntry(key, nblocks)
        entry.refs = 1
        self.entries[key] = entry
        self.cached += nblocks
        return entry

    def check(self) -> None:
        """Recount everything from scratch and compare (for tests)."""
        cached = sum(e.nblocks for e in self.entries.values())
        evictable = sum(e.nblocks for e in self.lru.values())
        pinned = sum(e.nblocks for e in self.entries.values() if e.pins)
        assert cached == self.cached, (cached, self.cached)
        assert evictable == self.evictable, (evictable, self.evictable)
        assert pinned == self.pinned_blocks, (pinned, self.pinned_blocks)
        assert all(e.refs == 0 for e in self.lru.values())
        assert all(e.refs > 0 for k, e in self.entries.items() if k not in self.lru)
        assert self.private >= 0 and self.cached + self.private <= self.total
