"""Prefix-aware routing across replicas of one model: the pure logic, no I/O.

A prompt is cut into fixed-size chunks and each full chunk is named by a *chained* hash (the
hash of its parent's hash and its own content), so one hash stands for the whole prefix that
ends with that chunk, as in vLLM's block hashes. Each replica gets an approximate
`PrefixIndex` (chained hash -> last touch) that the router updates when it sends a request
there and ages like the engine's cache: bounded capacity in chunks with least-recently-touched
eviction, and an optional TTL. `LoadTracker` keeps each replica's in-flight requests and
outstanding tokens.

Routing policies (`RoutingPolicy`) share one interface, `choose(request, replicas) -> replica
index`:
- `round_robin` — the next available replica in turn;
- `least_load` — fewest outstanding tokens (then fewest in-flight requests);
- `cache_aware` — sgl-router's policy with its command-line defaults (see `CacheAwareConfig`);
- `treadle` — two candidates per request as in DualMap (best prefix match vs least loaded)
  compared by estimated cost (queueing delay + prefill time of the uncached part), session
  affinity per program with work stealing from an overloaded replica, and the sgl-router
  imbalance guard.

Chunking of chat requests is the `TokenEstimator`'s (`treadle.backends.tokens`), given by
the caller: one with the engine's tokenizer gives token ids, chunked by `chunk_tokens`;
otherwise (the default, `CHARS`) the rendered prompt text is cut into chunks of
`chunk_tokens * chars_per_token` characters (a character chunk is an equally valid prefix key;
only the token counts are estimates then). Each decision costs O(prompt chunks) per replica
holding a match, and the walk stops at the first miss.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from treadle.backends.base import LLMRequest
from treadle.backends.tokens import CHARS, TokenEstimator, prompt_text
from treadle.errors import BackendError

#: engine KV block size (vLLM default), also the default routing chunk
DEFAULT_CHUNK_TOKENS = 16
#: seed of every chain: the hash of "no parent"
_ROOT = 0x5EED


class NoReplicaAvailable(BackendError, RuntimeError):
    """Every replica is marked unavailable; there is nothing to route to."""


# -- chunking ------------------------------------------------------------------------------


def chain_token_chunks(
    tokens: Sequence[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[int, ...]:
    """Chained hashes of the full `chunk_tokens`-sized chunks of `tokens` (a partial tail is
    not a key: engines cache only full blocks). Python's hash of a tuple of ints is stable
    across processes (hash randomisation applies to str/bytes only)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    out: list[int] = []
    parent = _ROOT
    for start in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        parent = hash((parent, tuple(tokens[start : start + chunk_tokens])))
        out.append(parent)
    return tuple(out)


def chain_block_ids(block_ids: Sequence[Hashable]) -> tuple[int, ...]:
    """Chain ids that already name whole blocks (Mooncake `hash_ids`: equal id = equal
    content); chaining makes a key stand for the prefix, not the block alone. An id may be
    any hashable value, e.g. `(hash_id, n_tokens)` where a partial last block must not
    match the full block of the same id."""
    out: list[int] = []
    parent = _ROOT
    for block in block_ids:
        parent = hash((parent, block))
        out.append(parent)
    return tuple(out)


def chain_text_chunks(text: str, chunk_chars: int) -> tuple[int, ...]:
    """Chained hashes of full `chunk_chars`-character chunks (blake2b, stable across runs)."""
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    out: list[int] = []
    parent = b""
    data = text.encode("utf-8")
    # Bytes, not characters, keep the cut cheap; a multi-byte character split across two
    # chunks still hashes deterministically, which is all a prefix key needs.
    for start in range(0, len(data) - chunk_chars + 1, chunk_chars):
        parent = hashlib.blake2b(parent + data[start : start + chunk_chars], digest_size=8).digest()
        out.append(int.from_bytes(parent, "big"))
    return tuple(out)


# -- request features ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What a policy sees of a request.

    `chunks` are chained hashes, one per full chunk of `chunk_tokens` tokens; `now` is the
    decision time in the caller's clock (virtual seconds in the simulator, monotonic
    seconds in the pool)."""

    chunks: tuple[int, ...]
    prompt_tokens: int
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    output_tokens: int = 0
    program_id: str | None = None
    now: float = 0.0

    @classmethod
    def from_request(
        cls,
        request: LLMRequest,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        now: float = 0.0,
        tokens: TokenEstimator = CHARS,
    ) -> RequestFeatures:
        ids = tokens.token_ids(request)
        if ids is not None:
            chunks = chain_token_chunks(ids, chunk_tokens)
            n_tokens = len(ids)
        else:
            text = prompt_text(request)
            chunks = chain_text_chunks(text, chunk_tokens * tokens.chars_per_token)
            n_tokens = tokens.count(text)
        return cls(
            chunks=chunks,
            prompt_tokens=n_tokens,
            chunk_tokens=chunk_tokens,
            output_tokens=request.max_tokens or 0,
            program_id=request.hints.program_id,
            now=now,
        )


# -- the approximate per-replica prefix index -----------------------------------------------


class PrefixIndex:
    """Which prefixes one replica probably holds: chained chunk hash -> last-touch time.

    Ordered by touch time, least recent first, so eviction is O(1) per chunk. A chain is
    touched tail first, so its root ends up most recent and is evicted last: the engine
    (vLLM) frees a request's blocks in reverse order for the same reason — evicting a
    parent before its children would strand them."""

    __slots__ = (
        "_entries",
        "actual_tokens",
        "capacity",
        "max_capacity",
        "predicted_tokens",
        "ttl_s",
    )

    def __init__(self, capacity_chunks: int | None = None, *, ttl_s: float | None = None):
        if capacity_chunks is not None and capacity_chunks <= 0:
            raise ValueError(f"capacity_chunks must be positive or None, got {capacity_chunks}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")
        self._entries: OrderedDict[int, float] = OrderedDict()
        self.capacity = capacity_chunks
        self.max_capacity = capacity_chunks
        self.ttl_s = ttl_s
        #: feedback totals: what the index predicted vs what the engine reported
        self.predicted_tokens = 0
        self.actual_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk: int) -> bool:
        return chunk in self._entries

    def touched_at(self, chunk: int) -> float | None:
        """When `chunk` was last touched (None: not held)."""
        return self._entries.get(chunk)

    def match(self, chunks: Sequence[int], now: float) -> int:
        """Number of leading chunks present (and not older than the TTL)."""
        entries = self._entries
        ttl = self.ttl_s
        n = 0
        for chunk in chunks:
            touched = entries.get(chunk)
            if touched is None or (ttl is not None and now - touched > ttl):
                break
            n += 1
        return n

    def insert(self, chunks: Sequence[int], now: float) -> None:
        """Record that the replica now holds every prefix of `chunks`; evict beyond capacity."""
        entries = self._entries
        for chunk in reversed(chunks):
            entries[chunk] = now
            entries.move_to_end(chunk)
        self.evict_to(self.capacity, now)

    def evict_to(self, capacity: int | None, now: float) -> int:
        """Drop least recently touched chunks down to `capacity` and any past the TTL."""
        entries = self._entries
        dropped = 0
        if capacity is not None:
            while len(entries) > capacity:
                entries.popitem(last=False)
                dropped += 1
        if self.ttl_s is not None:
            horizon = now - self.ttl_s
            while entries:
                oldest = next(iter(entries.values()))
                if oldest >= horizon:
                    break
                entries.popitem(last=False)
                dropped += 1
        return dropped

    def forget(self, chunks: Sequence[int], keep: int) -> None:
        """Remove `chunks[keep:]`: what a failed request was assumed to leave behind."""
        for chunk in chunks[keep:]:
            self._entries.pop(chunk, None)

    def observe(self, predicted_tokens: int, actual_tokens: int, *, adapt: bool = False) -> None:
        """Correct the index from what the engine reported as cached for a request.

        With `adapt`, the capacity estimate shrinks multiplicatively when the engine held
        less than predicted (its cache is smaller than assumed, e.g. running requests hold
        blocks) and regrows additively up to the configured capacity when it held as much."""
        self.predicted_tokens += predicted_tokens
        self.actual_tokens += actual_tokens
        if not adapt or self.capacity is None or self.max_capacity is None:
            return
        if actual_tokens < predicted_tokens:
            self.capacity = max(self.max_capacity // 8, int(self.capacity * 0.95))
        elif predicted_tokens > 0:
            self.capacity = min(self.max_capacity, self.capacity + max(1, self.max_capacity // 200))


# -- load tracking ---------------------------------------------------------------------------


@dataclass(slots=True)
class ReplicaState:
    """What the router knows about one replica's load and health."""

    index: int
    name: str
    available: bool = True
    in_flight: int = 0
    #: prompt tokens routed there, not known to be cached, whose prefill has not finished
    pending_prefill_tokens: int = 0
    #: expected output tokens of the requests in flight
    pending_decode_tokens: int = 0
    routed: int = 0

    @property
    def outstanding_tokens(self) -> int:
        return self.pending_prefill_tokens + self.pending_decode_tokens


@dataclass(slots=True)
class Ticket:
    """One routed request, returned by `Router.route`, handed back on progress."""

    replica: int
    request: RequestFeatures
    predicted_cached_tokens: int
    prefill_open: bool = True
    done: bool = False

    @property
    def prefill_tokens(self) -> int:
        return max(0, self.request.prompt_tokens - self.predicted_cached_tokens)


class LoadTracker:
    """In-flight requests and outstanding tokens per replica, from the router's own view."""

    def __init__(self, names: Sequence[str]):
        if not names:
            raise ValueError("a pool needs at least one replica")
        self.states = [ReplicaState(index=i, name=n) for i, n in enumerate(names)]

    def begin(self, ticket: Ticket) -> None:
        state = self.states[ticket.replica]
        state.in_flight += 1
        state.routed += 1
        state.pending_prefill_tokens += ticket.prefill_tokens
        state.pending_decode_tokens += ticket.request.output_tokens

    def prefill_done(self, ticket: Ticket) -> None:
        if ticket.prefill_open and not ticket.done:
            ticket.prefill_open = False
            self.states[ticket.replica].pending_prefill_tokens -= ticket.prefill_tokens

    def end(self, ticket: Ticket) -> None:
        if ticket.done:
            return
        self.prefill_done(ticket)
        ticket.done = True
        state = self.states[ticket.replica]
        state.in_flight -= 1
        state.pending_decode_tokens -= ticket.request.output_tokens


# -- policies ----------------------------------------------------------------------------------


class RoutingPolicy(Protocol):
    """A routing policy. `choose` may update the policy's own index (as sgl-router inserts
    the request into its tree when it selects a worker) and sets `last_cached_tokens`: how
    many prompt tokens it expects the chosen replica to have cached."""

    name: str
    last_cached_tokens: int

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int: ...

    def feedback(
        self, ticket: Ticket, *, cached_tokens: int | None, ok: bool, now: float
    ) -> None: ...


def _available(replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    live = [r for r in replicas if r.available]
    if not live:
        raise NoReplicaAvailable("no replica is available")
    return live


def _is_imbalanced(loads: Sequence[int], abs_threshold: float, rel_threshold: float) -> bool:
    """sgl-router: imbalanced when max - min > abs and max > rel * min."""
    hi, lo = max(loads), min(loads)
    return hi - lo > abs_threshold and hi > rel_threshold * lo


class RoundRobinPolicy:
    """The next available replica in turn (no cache or load knowledge)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()
        self.last_cached_tokens = 0

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int:
        _available(replicas)
        n = len(replicas)
        for _ in range(n):
            idx = next(self._counter) % n
            if replicas[idx].available:
                return idx
        raise NoReplicaAvailable("no replica is available")  # unreachable: checked above

    def feedback(self, ticket: Ticket, *, cached_tokens: int | None, ok: bool, now: float) -> None:
        return None


class LeastLoadPolicy:
    """Fewest outstanding tokens, then fewest in-flight requests, then lowest index."""

    name = "least_load"

    def __init__(self) -> None:
        self.last_cached_tokens = 0

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int:
        best = min(_available(replicas), key=lambda r: (r.outstanding_tokens, r.in_flight, r.index))
        return best.index

    def feedback(self, ticket: Ticket, *, cached_tokens: int | None, ok: bool, now: float) -> None:
        return None


@dataclass(frozen=True)
class CacheAwareConfig:
    """sgl-router's cache-aware policy, with the defaults of its command line
    (sgl-project/sglang, `sgl-router/src/main.rs`, `CliArgs`: `--cache-threshold 0.3`,
    `--balance-abs-threshold 64`, `--balance-rel-threshold 1.5`, `--eviction-interval 120`,
    `--max-tree-size 67108864`). (`CacheAwareConfig::default()` in
    `sgl-router/src/policies/mod.rs` has other values — 0.5, 32, 1.1, 30 s, 10,000 — but a
    router started from the CLI, the normal way, gets the ones above.)

    The router's tree stores characters; `max_tree_size` is counted here in tokens, one
    character of sgl-router's tree standing for one token of ours."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_s: float = 120.0
    max_tree_size: int = 67_108_864


class CacheAwarePolicy:
    """sgl-router `cache_aware` (`sgl-router/src/policies/cache_aware.rs`).

    Load = in-flight requests per worker. When imbalanced (max - min > abs and max > rel *
    min) go to the shortest queue; otherwise, when the best prefix match covers more than
    `cache_threshold` of the prompt, go to the worker with that match, else to the worker
    with the smallest tree. The chosen worker's tree gets the request in both cases. Trees
    are only trimmed to `max_tree_size` every `eviction_interval_s`, LRU first — they do
    not know what the engine evicted."""

    name = "cache_aware"

    def __init__(self, n_replicas: int, config: CacheAwareConfig | None = None):
        self.config = config or CacheAwareConfig()
        self.trees = [PrefixIndex(None) for _ in range(n_replicas)]
        self._last_eviction: float | None = None
        self._chunk_tokens = DEFAULT_CHUNK_TOKENS
        self.last_cached_tokens = 0

    def _maybe_evict(self, now: float) -> None:
        if self._last_eviction is None:
            self._last_eviction = now
            return
        if now - self._last_eviction >= self.config.eviction_interval_s:
            self._last_eviction = now
            for tree in self.trees:
                # upstream counts characters; here tokens, held as chunks of chunk_tokens
                tree.evict_to(max(1, self.config.max_tree_size // self._chunk_tokens), now)

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int:
        live = _available(replicas)
        now = request.now
        self._chunk_tokens = request.chunk_tokens
        self._maybe_evict(now)
        cfg = self.config
        loads = [r.in_flight for r in replicas]
        if _is_imbalanced(loads, cfg.balance_abs_threshold, cfg.balance_rel_threshold):
            idx = min(live, key=lambda r: (r.in_flight, r.index)).index
        else:
            best_idx, best_match = -1, 0
            best_touch = float("-inf")
            for r in live:
                tree = self.trees[r.index]
                m = tree.match(request.chunks, now)
                if m == 0:
                    continue
                touched = tree.touched_at(request.chunks[m - 1]) or 0.0
                if m > best_match or (m == best_match and touched > best_touch):
                    best_idx, best_match, best_touch = r.index, m, touched
            matched_tokens = best_match * request.chunk_tokens
            rate = matched_tokens / request.prompt_tokens if request.prompt_tokens else 0.0
            if best_idx >= 0 and rate > cfg.cache_threshold:
                idx = best_idx
            else:
                idx = min(live, key=lambda r: (len(self.trees[r.index]), r.index)).index
        self.last_cached_tokens = self.trees[idx].match(request.chunks, now) * request.chunk_tokens
        self.trees[idx].insert(request.chunks, now)
        return idx

    def feedback(self, ticket: Ticket, *, cached_tokens: int | None, ok: bool, now: float) -> None:
        # sgl-router leaves its tree as it is on completion (on_request_complete only logs).
        return None


@dataclass(frozen=True)
class TreadleRoutingConfig:
    """Knobs of the `treadle` policy.

    `capacity_chunks` should be the engine's prefix-cache capacity in chunks (KV blocks
    for 16-token chunks) so the index ages like the engine's LRU cache; `prefill_tokens_per_s`
    converts queued tokens to seconds (the engine profile's prefill rate), and
    `prefill_time_s(n, cached)`, when given, is the time a lone `n`-token prompt with `cached`
    tokens cached takes (e.g. the simulator's `Profile.prefill_time`, which counts attention
    over long contexts); without it, uncached tokens / `prefill_tokens_per_s`."""

    prefill_tokens_per_s: float = 20_000.0
    prefill_time_s: Callable[[int, int], float] | None = None
    capacity_chunks: int | None = None
    ttl_s: float | None = None
    #: sgl-router-style guard on in-flight requests (same defaults as cache_aware)
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    #: a program's replica keeps its work until its queueing delay exceeds this ...
    steal_delay_s: float = 1.0
    #: ... and exceeds the least loaded replica's by this factor
    steal_factor: float = 2.0
    #: forget a program's replica after this long without requests
    affinity_ttl_s: float = 600.0
    #: correct the index capacity from the cached tokens engines report
    adapt_capacity: bool = True
    #: prefill a choice adds is counted (1 + work_weight) times: once for this request's
    #: own TTFT, and work_weight times for the requests that will queue behind it there
    #: (recomputing a cached prefix elsewhere delays them too). 3 was best of 0-6 on the
    #: Mooncake trace both with single-GPU and with 8-GPU replicas (benchmarks/dispatch.py).
    work_weight: float = 3.0


class TreadleRoutingPolicy:
    """Cost-based choice between the best-matching and the least-loaded replica.

    cost(r) = queueing delay(r) + (1 + work_weight) x prefill time of the prompt given what r
    holds, with queueing delay = tokens routed to r whose prefill has not finished / prefill
    rate.
    A program sticks to its replica (where its cache, possibly pinned, lives) unless that
    replica is overloaded; then another replica steals the work and becomes the program's."""

    name = "treadle"

    def __init__(self, n_replicas: int, config: TreadleRoutingConfig | None = None):
        self.config = config or TreadleRoutingConfig()
        cfg = self.config
        self.indexes = [
            PrefixIndex(cfg.capacity_chunks, ttl_s=cfg.ttl_s) for _ in range(n_replicas)
        ]
        #: program id -> (its replica, when it last sent a request)
        self.affinity: dict[str, tuple[int, float]] = {}
        self._prune_at = 1024
        self.last_cached_tokens = 0
        self.steals = 0
        self.guarded = 0

    def queue_delay_s(self, replica: ReplicaState) -> float:
        return replica.pending_prefill_tokens / self.config.prefill_tokens_per_s

    def prefill_s(self, request: RequestFeatures, matched_chunks: int) -> float:
        """Prefill time of `request` alone with `matched_chunks` chunks cached."""
        cfg = self.config
        n = request.prompt_tokens
        cached = min(matched_chunks * request.chunk_tokens, n)
        if cfg.prefill_time_s is not None and n > 0:
            # engines always compute the last prompt token
            return cfg.prefill_time_s(n, min(cached, n - 1))
        return (n - cached) / cfg.prefill_tokens_per_s

    def cost_s(self, replica: ReplicaState, request: RequestFeatures, matched_chunks: int) -> float:
        return self.queue_delay_s(replica) + (1.0 + self.config.work_weight) * self.prefill_s(
            request, matched_chunks
        )

    def _least_loaded(self, live: Sequence[ReplicaState]) -> ReplicaState:
        # ties (an idle pool) go to the replica whose cache holds least: spreads new content
        return min(
            live,
            key=lambda r: (
                r.pending_prefill_tokens,
                r.in_flight,
                len(self.indexes[r.index]),
                r.index,
            ),
        )

    def _dual_choice(
        self, request: RequestFeatures, live: Sequence[ReplicaState], matches: dict[int, int]
    ) -> int:
        """DualMap-style: the best prefix match vs the least loaded, by estimated cost."""
        least = self._least_loaded(live)
        # among equal matches the cost differs only by queueing delay
        best = max(
            live,
            key=lambda r: (matches[r.index], -r.pending_prefill_tokens, -r.in_flight, -r.index),
        )
        if best.index == least.index:
            return best.index
        c_best = self.cost_s(best, request, matches[best.index])
        c_least = self.cost_s(least, request, matches[least.index])
        # equal cost: the least loaded keeps queues short for what comes next
        return best.index if c_best < c_least else least.index

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> int:
        cfg = self.config
        live = _available(replicas)
        now = request.now
        matches = {r.index: self.indexes[r.index].match(request.chunks, now) for r in live}
        idx: int | None = None

        loads = [r.in_flight for r in replicas]
        if _is_imbalanced(loads, cfg.balance_abs_threshold, cfg.balance_rel_threshold):
            self.guarded += 1
            idx = min(live, key=lambda r: (r.in_flight, r.index)).index

        if idx is None and request.program_id is not None:
            sticky = self.affinity.get(request.program_id)
            if sticky is not None and now - sticky[1] <= cfg.affinity_ttl_s:
                home = replicas[sticky[0]]
                if home.available:
                    others = [r for r in live if r.index != home.index]
                    delay = self.queue_delay_s(home)
                    overloaded = (
                        bool(others)
                        and delay > cfg.steal_delay_s
                        and delay
                        > cfg.steal_factor * self.queue_delay_s(self._least_loaded(others))
                    )
                    if overloaded:
                        # the work is stolen: it goes elsewhere, and the program moves there
                        self.steals += 1
                        idx = self._dual_choice(request, others, matches)
                    else:
                        idx = home.index

        if idx is None:
            idx = self._dual_choice(request, live, matches)

        self.last_cached_tokens = matches[idx] * request.chunk_tokens
        self.indexes[idx].insert(request.chunks, now)
        if request.program_id is not None:
            self._remember(request.program_id, idx, now)
        return idx

    def _remember(self, program_id: str, idx: int, now: float) -> None:
        self.affinity[program_id] = (idx, now)
        # prune programs gone quiet, amortised: at most every 1,024 new programs
        if len(self.affinity) >= self._prune_at:
            horizon = now - self.config.affinity_ttl_s
            self.affinity = {p: v for p, v in self.affinity.items() if v[1] >= horizon}
            self._prune_at = max(1024, 2 * len(self.affinity))

    def feedback(self, ticket: Ticket, *, cached_tokens: int | None, ok: bool, now: float) -> None:
        index = self.indexes[ticket.replica]
        request = ticket.request
        if not ok:
            # The prompt never reached the replica's cache: take back what routing assumed.
            index.forget(request.chunks, ticket.predicted_cached_tokens // request.chunk_tokens)
            if request.program_id is not None:
                home = self.affinity.get(request.program_id)
                if home is not None and home[0] == ticket.replica:
                    del self.affinity[request.program_id]
            return
        if cached_tokens is not None:
            index.observe(
                ticket.predicted_cached_tokens, cached_tokens, adapt=self.config.adapt_capacity
            )


ROUTING_POLICIES = ("round_robin", "least_load", "cache_aware", "treadle")


def make_routing_policy(name: str, n_replicas: int, **options: Any) -> RoutingPolicy:
    """Build a policy by name; `options` go to its config (`CacheAwareConfig`,
    `TreadleRoutingConfig`)."""
    if name == "round_robin":
        _no_options(name, options)
        return RoundRobinPolicy()
    if name == "least_load":
        _no_options(name, options)
        return LeastLoadPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(n_replicas, CacheAwareConfig(**options))
    if name == "treadle":
        return TreadleRoutingPolicy(n_replicas, TreadleRoutingConfig(**options))
    raise ValueError(
        f"unknown routing policy {name!r}; choose one of {', '.join(ROUTING_POLICIES)}"
    )


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"policy {name!r} takes no options, got {sorted(options)}")


# -- the router: policy + load tracking -------------------------------------------------------


@dataclass
class Router:
    """A policy plus the load it acts on. The caller reports progress on each ticket."""

    policy: RoutingPolicy
    names: Sequence[str]
    tracker: LoadTracker = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = LoadTracker(self.names)

    @property
    def states(self) -> list[ReplicaState]:
        return self.tracker.states

    def set_available(self, index: int, available: bool) -> None:
        self.tracker.states[index].available = available

    def route(self, request: RequestFeatures) -> Ticket:
        idx = self.policy.choose(request, self.tracker.states)
        if not self.tracker.states[idx].available:
            raise RuntimeError(f"policy {self.policy.name} chose unavailable replica {idx}")
        ticket = Ticket(
            replica=idx,
            request=request,
            predicted_cached_tokens=min(self.policy.last_cached_tokens, request.prompt_tokens),
        )
        self.tracker.begin(ticket)
        return ticket

    def prefill_done(self, ticket: Ticket) -> None:
        self.tracker.prefill_done(ticket)

    def finish(
        self, ticket: Ticket, *, now: float, cached_tokens: int | None = None, ok: bool = True
    ) -> None:
        if ticket.done:
            return
        self.tracker.end(ticket)
        self.policy.feedback(ticket, cached_tokens=cached_tokens, ok=ok, now=now)
