"""Content identity of token sequences for the prefix cache: chained block hashes.

vLLM identifies each *full* 16-token block of KV by a hash of (parent block's hash, the
block's tokens), so equal hashes mean equal prefixes and a new request reuses the longest
chain of cached blocks. A `Prompt` carries those hashes for a sequence, in one of three
forms:

- `Prompt.from_tokens(ids)` — exact vLLM semantics: one hash per full block of token ids.
- `Prompt.from_segments([(key, n_tokens), ...])` — opaque content: each segment stands for
  `n_tokens` tokens whose identity is `key` (equal keys after equal prefixes = equal
  content). Workload generators use this to avoid materialising millions of token ids.
- `Prompt.from_block_keys(keys, num_tokens, tokens_per_key=512)` — a trace's per-block ids
  (Mooncake: one id per 512-token block; the last block holds the remainder): a segment
  per key.
- `Prompt.anonymous(n)` — content that is never shared (no hashes at all).

**Extents.** The cache does not need one dictionary entry per 16-token block when blocks
are always allocated, hit and freed together, so a `Prompt` groups its full blocks into
*extents*: a run of blocks identified by one chained hash and stored as one cache entry.
For token ids every extent is a single block (exactly vLLM). For a segment, the extent is
the blocks that end inside it — the segment's 16-token sub-blocks, whose own hashes are
`hash((extent hash, j))` (`block_hashes()` expands them). The one approximation this makes
is that eviction frees a whole extent at a time (at most a segment, e.g. 512 tokens), and a
segment whose length differs (a trace's partial last block) is different content.

Public API (stable):

    Prompt.from_tokens(ids, block_size=16)
    Prompt.from_segments(segments, block_size=16)
    Prompt.from_block_keys(keys, num_tokens, tokens_per_key=512, block_size=16)
    Prompt.anonymous(num_tokens, block_size=16)
    p.num_tokens, p.block_size, p.keys (extent hashes), p.ends (cumulative block counts)
    p.extend_tokens(ids) / p.extend_segments(segments) -> Prompt   # same form only
    p.extents() -> list[(hash, n_blocks)];  p.block_hashes() -> list[int]
    p.cacheable_tokens                                   # tokens in full, identified blocks
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Literal

Kind = Literal["tokens", "segments", "anonymous"]

_ROOT = hash(("treadle.sim", 0))


class Prompt:
    """Chained block hashes of a token sequence, grouped into extents (module docstring)."""

    __slots__ = ("_chain", "_kind", "_tail", "block_size", "ends", "keys", "num_tokens")

    def __init__(
        self,
        *,
        num_tokens: int,
        block_size: int,
        keys: tuple[int, ...],
        ends: tuple[int, ...],
        kind: Kind,
        chain: int,
        tail: tuple[int, ...] = (),
    ):
        self.num_tokens = num_tokens
        self.block_size = block_size
        #: chained hash of each extent
        self.keys = keys
        #: cumulative block count at the end of each extent (strictly increasing)
        self.ends = ends
        self._kind: Kind = kind
        self._chain = chain
        self._tail = tail

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def from_tokens(
        cls, tokens: Sequence[int], block_size: int = 16, salt: str | None = None
    ) -> Prompt:
        """One extent per full block of `tokens`, hashed as (parent hash, block tokens).

        A `salt` (vLLM's `cache_salt`) goes into the first block's hash, so the chain, and
        every block of it, is shared only with prompts of the same salt: a server salts
        each tenant's requests with its own, and tenants never hit each other's cache."""
        root = _ROOT if salt is None else hash((_ROOT, "salt", salt))
        empty = cls(
            num_tokens=0, block_size=block_size, keys=(), ends=(), kind="tokens", chain=root
        )
        return empty.extend_tokens(tokens)

    @classmethod
    def from_segments(
        cls, segments: Iterable[tuple[Hashable, int]], block_size: int = 16
    ) -> Prompt:
        """Opaque content: each `(key, n_tokens)` segment is `n_tokens` tokens named `key`."""
        empty = cls(
            num_tokens=0, block_size=block_size, keys=(), ends=(), kind="segments", chain=_ROOT
        )
        return empty.extend_segments(segments)

    @classmethod
    def from_block_keys(
        cls,
        keys: Sequence[Hashable],
        num_tokens: int,
        tokens_per_key: int = 512,
        block_size: int = 16,
    ) -> Prompt:
        """A trace's block ids: key i covers tokens [i*tokens_per_key, (i+1)*tokens_per_key),
        the last key the remainder. `num_tokens` must fall inside the last key's block."""
        n_keys = len(keys)
        if num_tokens < 1 or not (n_keys - 1) * tokens_per_key < num_tokens <= (
            n_keys * tokens_per_key
        ):
            raise ValueError(
                f"{n_keys} keys of {tokens_per_key} tokens cannot hold {num_tokens} tokens"
            )
        last = num_tokens - (n_keys - 1) * tokens_per_key
        segments = [(k, tokens_per_key) for k in keys[:-1]]
        segments.append((keys[-1], last))
        return cls.from_segments(segments, block_size)

    @classmethod
    def anonymous(cls, num_tokens: int, block_size: int = 16) -> Prompt:
        """`num_tokens` tokens that share nothing with anything: never hit, never cached."""
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")
        return cls(
            num_tokens=num_tokens,
            block_size=block_size,
            keys=(),
            ends=(),
            kind="anonymous",
            chain=_ROOT,
        )

    # -- extension -------------------------------------------------------------------------

    def extend_tokens(self, tokens: Sequence[int]) -> Prompt:
        """This sequence followed by `tokens` (token-id prompts only)."""
        if self._kind != "tokens":
            raise TypeError(f"cannot append token ids to a {self._kind} prompt")
        bs = self.block_size
        seq = self._tail + tuple(tokens)
        keys = list(self.keys)
        ends = list(self.ends)
        chain = self._chain
        block = ends[-1] if ends else 0
        full = len(seq) - len(seq) % bs
        for i in range(0, full, bs):
            chain = hash((chain, seq[i : i + bs]))
            block += 1
            keys.append(chain)
            ends.append(block)
        return Prompt(
            num_tokens=self.num_tokens + len(tokens),
            block_size=bs,
            keys=tuple(keys),
            ends=tuple(ends),
            kind="tokens",
            chain=chain,
            tail=seq[full:],
        )

    def extend_segments(self, segments: Iterable[tuple[Hashable, int]]) -> Prompt:
        """This sequence followed by opaque segments (segment prompts only)."""
        if self._kind != "segments":
            raise TypeError(f"cannot append segments to a {self._kind} prompt")
        bs = self.block_size
        keys = list(self.keys)
        ends = list(self.ends)
        chain = self._chain
        pos = self.num_tokens
        covered = ends[-1] if ends else 0
        for key, n in segments:
            if n < 1:
                raise ValueError(f"segment {key!r} has {n} tokens; need >= 1")
            # The chain covers every segment (and its length), so a partial block that
            # spans segments is named by all of them.
            chain = hash((chain, key, n))
            pos += n
            if pos // bs > covered:
                covered = pos // bs
                keys.append(chain)
                ends.append(covered)
        return Prompt(
            num_tokens=pos,
            block_size=bs,
            keys=tuple(keys),
            ends=tuple(ends),
            kind="segments",
            chain=chain,
        )

    def extend_anonymous(self, n: int) -> Prompt:
        """This sequence followed by `n` tokens with no identity (no new extents)."""
        return Prompt(
            num_tokens=self.num_tokens + n,
            block_size=self.block_size,
            keys=self.keys,
            ends=self.ends,
            kind="anonymous",
            chain=self._chain,
        )

    # -- views -----------------------------------------------------------------------------

    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def cacheable_tokens(self) -> int:
        """Tokens in full blocks that have an identity (what a later request could hit)."""
        return (self.ends[-1] if self.ends else 0) * self.block_size

    def extents(self) -> list[tuple[int, int]]:
        """(extent hash, number of blocks) for each extent, in order."""
        out: list[tuple[int, int]] = []
        prev = 0
        for key, end in zip(self.keys, self.ends, strict=True):
            out.append((key, end - prev))
            prev = end
        return out

    def block_hashes(self) -> list[int]:
        """One hash per full 16-token block (an extent's blocks are (extent hash, j))."""
        if self._kind == "tokens":
            return list(self.keys)
        return [hash((key, j)) for key, n in self.extents() for j in range(n)]

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"Prompt({self._kind}, {self.num_tokens} tokens, {len(self.keys)} extents)"
