"""`LlamaCppBackend`: llama.cpp's `llama-server` with program affinity, pins and KV offload
built on its slots.

A `llama-server -np N` has N slots; each keeps the KV of the last sequence it ran until
another request takes it, and a request reuses the KV of its longest common prefix with
its slot's sequence (`cache_prompt`). There is no shared prefix cache, no program id and
no pin: whether an agent's next call finds its context is a matter of which slot it lands
in and what ran there meanwhile. This backend decides that itself, sending every request
with an explicit `id_slot`, from a `SlotTable` that knows what each slot holds:

- **Affinity.** A request goes to the idle slot whose sequence shares the longest message
  prefix with its messages (its own program's previous turn, or a shared system prompt),
  unless taking that slot would throw away a program's context that will be needed again
  (a program waiting on a tool) for less than it reuses; otherwise to an empty slot, then
  the least recently used one.
- **Pinning** (`Capabilities.pin_ttl`): a call that ends in tool calls with `pin_ttl_s` in
  its hints (the runtime's `PinPolicy` sets it from the tool's predicted duration) reserves
  its slot for that long; no other program's request is placed there until the program's
  next call, `release_pins(program_id)` or the deadline. At most `max_pinned_slots` (by
  default all but one) are pinned at once; a pin over that is refused.
- **KV offload**: when a request must take a slot whose program is waiting on a tool, the
  slot is first saved to a file under the server's `--slot-save-path`
  (`POST /slots/{id}?action=save`); when that program comes back and its slot was taken,
  its file is restored into an idle slot (`?action=restore`) and the request reuses it.
  Saving happens only on eviction, so a program whose slot survives costs nothing.

The table assumes this backend is the server's only client (as a replica behind treadle's
pool is). Every counter it keeps (`stats`) is what the benchmarks report: pins set and
refused, saves and restores with their tokens and milliseconds, and waits for a slot.
`metrics()` adds the table's view of the server (slots in use or pinned, as `kv_usage`)
to the server's Prometheus counters.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from treadle.backends.base import (
    BackendError,
    Capabilities,
    LLMRequest,
    LLMResponse,
    Message,
    StreamChunk,
)
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.openai_compat.dialects import LlamaCppDialect
from treadle.backends.openai_compat.server_metrics import ServerLoad

_log = logging.getLogger(__name__)

#: (hash of the messages so far, characters so far), one entry per message
Chain = tuple[tuple[bytes, int], ...]


def message_chain(messages: Sequence[Message], base: Chain = ()) -> Chain:
    """The prefix chain of `messages` appended to `base`: equal entries mean equal
    conversations up to there. An assistant turn hashes its text and its tool calls' names
    and ids (the arguments' JSON may be re-serialised on the way back)."""
    out = list(base)
    digest, chars = base[-1] if base else (b"", 0)
    for m in messages:
        h = hashlib.blake2b(digest, digest_size=16)
        content = m.content or ""
        for part in (m.role, content, m.tool_call_id or "", m.name or ""):
            h.update(part.encode())
            h.update(b"\x00")
        for call in m.tool_calls:
            h.update(f"{call.id}\x01{call.name}\x00".encode())
        digest = h.digest()
        chars += len(content) + sum(len(c.arguments) + len(c.name) for c in m.tool_calls)
        out.append((digest, chars))
    return tuple(out)


def common_chars(a: Chain, b: Chain) -> int:
    """Characters of the longest common message prefix of two chains."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # chained hashes: equal at i implies equal before i
        mid = (lo + hi + 1) // 2
        if a[mid - 1][0] == b[mid - 1][0]:
            lo = mid
        else:
            hi = mid - 1
    return a[lo - 1][1] if lo else 0


def _chars(chain: Chain) -> int:
    return chain[-1][1] if chain else 0


@dataclass
class Saved:
    """A program's slot saved to a file on the server."""

    filename: str
    chain: Chain
    tokens: int


@dataclass
class Slot:
    id: int
    chain: Chain = ()
    #: program whose sequence the slot holds
    owner: str | None = None
    #: a request (or a save/restore) of this backend runs in it
    busy: bool = False
    pinned_until: float | None = None
    last_used: float = -math.inf
    #: tokens the server says the slot holds (from the last answer's usage)
    tokens: int = 0

    def pinned(self, now: float) -> bool:
        return self.pinned_until is not None and now < self.pinned_until


@dataclass
class Placement:
    """Where a request runs and what must happen first."""

    slot: Slot
    #: save the slot's current sequence (`save_chain`) for this program before taking it
    save_for: str | None = None
    save_chain: Chain = ()
    #: restore this file into the slot before sending
    restore: Saved | None = None
    #: characters of the request's prefix the slot (after any restore) already holds
    reuse_chars: int = 0


@dataclass
class SlotStats:
    """What the slot table did (the benchmark's counters)."""

    pins_set: int = 0
    pins_refused: int = 0
    pins_released: int = 0
    saves: int = 0
    saved_tokens: int = 0
    save_ms: float = 0.0
    restores: int = 0
    restored_tokens: int = 0
    restore_ms: float = 0.0
    failed_offloads: int = 0
    slot_waits: int = 0
    slot_wait_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass
class _Program:
    #: the program's last call ended in tool calls: its context will be needed again
    waiting: bool = False
    saved: Saved | None = None


class SlotTable:
    """The slots of one server and the programs in them: placement decisions, no I/O.

    `now` is passed in (seconds, any monotonic clock) so tests drive it directly.
    """

    def __init__(self, n_slots: int, *, max_pinned: int | None = None) -> None:
        if n_slots < 1:
            raise ValueError("a server has at least one slot")
        self.slots = [Slot(i) for i in range(n_slots)]
        self.max_pinned = n_slots - 1 if max_pinned is None else min(max_pinned, n_slots)
        self.programs: dict[str, _Program] = {}
        self.stats = SlotStats()

    # -- placement ---------------------------------------------------------------------------

    def place(
        self, program: str | None, chain: Chain, now: float, *, offload: bool
    ) -> Placement | None:
        """The best slot for a request of `program` with messages `chain`, or None when every
        slot is busy or pinned by another program (wait, then ask again)."""
        free = [
            s
            for s in self.slots
            if not s.busy and (not s.pinned(now) or (program is not None and s.owner == program))
        ]
        if not free:
            return None
        state = self.programs.get(program) if program is not None else None
        best: Slot | None = None
        best_score = -math.inf
        for slot in free:
            reuse = common_chars(slot.chain, chain)
            score = reuse - self._loss(slot, program, reuse, offload)
            if score > best_score or (
                score == best_score and best is not None and self._older(slot, best)
            ):
                best, best_score = slot, score
        assert best is not None
        reuse = common_chars(best.chain, chain)
        if state is not None and state.saved is not None and offload:
            from_file = common_chars(state.saved.chain, chain)
            if from_file > reuse:
                victim = min(free, key=lambda s: (self._loss(s, program, 0, offload), s.last_used))
                return Placement(
                    victim,
                    save_for=self._save_for(victim, program, offload),
                    save_chain=victim.chain,
                    restore=state.saved,
                    reuse_chars=from_file,
                )
        return Placement(
            best,
            save_for=self._save_for(best, program, offload),
            save_chain=best.chain,
            reuse_chars=reuse,
        )

    def _loss(self, slot: Slot, program: str | None, reuse: int, offload: bool) -> float:
        """Characters another program will recompute if this request takes `slot`."""
        owner = slot.owner
        if owner is None or owner == program:
            return 0.0
        state = self.programs.get(owner)
        if state is None or not state.waiting:
            return 0.0
        lost = _chars(slot.chain) - reuse
        # saved first (or already on file): only the save is paid, about nothing next to
        # recomputing; a tie-breaker keeps untouched slots first.
        return 1.0 if offload else float(lost) + 1.0

    def _save_for(self, slot: Slot, program: str | None, offload: bool) -> str | None:
        owner = slot.owner
        if not offload or owner is None or owner == program:
            return None
        state = self.programs.get(owner)
        if state is None or not state.waiting:
            return None
        if state.saved is not None and state.saved.chain == slot.chain:
            return None  # already on file
        return owner

    @staticmethod
    def _older(a: Slot, b: Slot) -> bool:
        """Whether `a` is the better victim of a tie: empty first, then least recently used."""
        return (bool(a.chain), a.last_used) < (bool(b.chain), b.last_used)

    # -- events ------------------------------------------------------------------------------

    def started(self, placement: Placement, program: str | None, chain: Chain, now: float) -> None:
        slot = placement.slot
        slot.busy = True
        slot.last_used = now
        if program is not None:
            state = self.programs.setdefault(program, _Program())
            state.waiting = False
            if slot.owner == program and slot.pinned_until is not None:
                self.stats.pins_released += 1
        slot.pinned_until = None
        slot.owner = program
        slot.chain = chain

    def finished(
        self,
        slot: Slot,
        program: str | None,
        chain: Chain,
        tokens: int,
        now: float,
        *,
        continues: bool,
        pin_ttl_s: float | None,
    ) -> None:
        """A request ended with the sequence `chain` (prompt and answer) in `slot`; the
        program `continues` after a tool, with a pin for `pin_ttl_s` when asked."""
        slot.busy = False
        slot.last_used = now
        slot.chain = chain
        slot.tokens = tokens
        if program is None:
            return
        state = self.programs.setdefault(program, _Program())
        state.waiting = continues
        if not continues:
            state.saved = None
            return
        if pin_ttl_s is not None and pin_ttl_s > 0:
            pinned = sum(1 for s in self.slots if s is not slot and s.pinned(now))
            if pinned < self.max_pinned:
                slot.pinned_until = now + pin_ttl_s
                self.stats.pins_set += 1
            else:
                self.stats.pins_refused += 1

    def failed(self, slot: Slot, now: float) -> None:
        """A request in `slot` failed: what the slot holds is unknown."""
        slot.busy = False
        slot.last_used = now
        slot.chain = ()
        slot.owner = None
        slot.pinned_until = None
        slot.tokens = 0

    def release(self, program: str) -> int:
        """Forget `program`: its pins end, its saved file is no longer wanted."""
        released = 0
        for slot in self.slots:
            if slot.owner == program and slot.pinned_until is not None:
                slot.pinned_until = None
                released += 1
        self.programs.pop(program, None)
        self.stats.pins_released += released
        return released

    def next_deadline(self, now: float) -> float | None:
        deadlines = [s.pinned_until for s in self.slots if s.pinned(now)]
        return min(deadlines) if deadlines else None  # type: ignore[type-var]

    def in_use(self, now: float) -> int:
        return sum(1 for s in self.slots if s.busy or s.pinned(now))


def _program_file(program: str) -> str:
    # llama.cpp accepts plain file names only (fs_validate_filename); program ids are not.
    return "treadle-" + hashlib.sha256(program.encode()).hexdigest()[:24] + ".bin"


class LlamaCppBackend(OpenAICompatBackend):
    """An `OpenAICompatBackend` for one `llama-server` that places requests in slots (module
    docstring). Options are `LlamaCppDialect`'s (`dialect_options`, or a dialect object).
    `clock` is the monotonic clock of pins (tests may pass their own)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        dialect: str | LlamaCppDialect = "llamacpp",
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        super().__init__(base_url, model, dialect=dialect, **options)
        if not isinstance(self.dialect, LlamaCppDialect):
            raise ValueError(
                f"LlamaCppBackend needs the llamacpp dialect, not {self.dialect.name!r}"
            )
        self.llama: LlamaCppDialect = self.dialect
        self.clock = clock
        self._table: SlotTable | None = None
        self._lock = anyio.Lock()
        self._changed = anyio.Event()

    @property
    def capabilities(self) -> Capabilities:
        return self.dialect.capabilities.model_copy(
            update={"pin_ttl": self.llama.pinning, "program_id": self.llama.manage_slots}
        )

    @property
    def stats(self) -> SlotStats:
        return self._table.stats if self._table is not None else SlotStats()

    @property
    def table(self) -> SlotTable | None:
        return self._table

    # -- calls ---------------------------------------------------------------------------

    async def generate(
        self,
        request: LLMRequest,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> LLMResponse:
        if not self.llama.manage_slots:
            response = await super().generate(
                request, extra_headers=extra_headers, extra_body=extra_body
            )
            self._refuse_leaked_call(request, response)
            return response
        async with self._placed(request) as (slot_body, done):
            response = await super().generate(
                request, extra_headers=extra_headers, extra_body={**(extra_body or {}), **slot_body}
            )
            self._refuse_leaked_call(request, response)
            done(response)
            return response

    async def stream(
        self,
        request: LLMRequest,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        if not self.llama.manage_slots:
            async for chunk in super().stream(
                request, extra_headers=extra_headers, extra_body=extra_body
            ):
                yield chunk
            return
        async with self._placed(request) as (slot_body, done):
            text: list[str] = []
            async for chunk in super().stream(
                request, extra_headers=extra_headers, extra_body={**(extra_body or {}), **slot_body}
            ):
                text.append(chunk.delta)
                if chunk.finish_reason is not None:
                    response = LLMResponse(
                        content="".join(text) or None,
                        tool_calls=chunk.tool_calls,
                        finish_reason=chunk.finish_reason,
                        usage=chunk.usage or LLMResponse().usage,
                    )
                    self._refuse_leaked_call(request, response)
                    done(response)
                yield chunk

    def _refuse_leaked_call(self, request: LLMRequest, response: LLMResponse) -> None:
        # llama.cpp returns a tool call cut at max_tokens before its arguments as text (the
        # raw `<tool_call>` markup) with finish_reason "length": not an answer, and not a
        # call to run. (A call cut inside its arguments is refused by the base class.)
        # Streamed, the markup is swallowed by the server's parser: tokens were generated
        # and nothing arrived.
        content = response.content or ""
        if (
            request.tools
            and response.finish_reason == "length"
            and not response.tool_calls
            and ("<tool_call>" in content or (not content and response.usage.completion_tokens))
        ):
            raise BackendError(
                f"{self.name}: the answer reached max_tokens in the middle of a tool call",
                retryable=False,
                replica=self.name,
            )

    async def release_pins(self, program_id: str) -> int:
        """End `program_id`'s pins and forget its saved KV (the run ended)."""
        if self._table is None:
            return 0
        released = self._table.release(program_id)
        self._notify()
        return released

    async def metrics(self) -> ServerLoad:
        load = await super().metrics()
        if self._table is None:
            return load
        usage = self._table.in_use(self.clock()) / len(self._table.slots)
        return load.model_copy(update={"kv_usage": usage})

    # -- placement ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _placed(
        self, request: LLMRequest
    ) -> AsyncIterator[tuple[dict[str, Any], Callable[[LLMResponse], None]]]:
        table = await self._slot_table()
        hints = request.hints
        program = hints.program_id
        chain = message_chain(request.messages)
        placement = await self._place(table, program, chain)
        slot = placement.slot
        outcome: list[LLMResponse] = []
        try:
            if placement.save_for is not None:
                await self._save(table, slot, placement.save_for, placement.save_chain)
            if placement.restore is not None:
                await self._restore(table, slot, placement.restore)
            yield {"id_slot": slot.id}, outcome.append
        except BaseException:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    if outcome:  # an aborted stream: the prompt is in the slot, the answer cut
                        table.finished(
                            slot, program, chain, 0, self.clock(), continues=False, pin_ttl_s=None
                        )
                    else:
                        table.failed(slot, self.clock())
                self._notify()
            raise
        response = outcome[0] if outcome else None
        async with self._lock:
            if response is None:
                table.finished(
                    slot, program, chain, 0, self.clock(), continues=False, pin_ttl_s=None
                )
            else:
                answer = Message(
                    role="assistant", content=response.content, tool_calls=response.tool_calls
                )
                usage = response.usage
                continues = bool(response.tool_calls) and not hints.is_last_step
                table.finished(
                    slot,
                    program,
                    message_chain([answer], chain),
                    usage.prompt_tokens + usage.completion_tokens,
                    self.clock(),
                    continues=continues,
                    pin_ttl_s=hints.pin_ttl_s if self.llama.pinning else None,
                )
        self._notify()

    async def _place(self, table: SlotTable, program: str | None, chain: Chain) -> Placement:
        waited_from: float | None = None
        while True:
            async with self._lock:
                now = self.clock()
                placement = table.place(program, chain, now, offload=self.llama.offload)
                if placement is not None:
                    table.started(placement, program, chain, now)
                    if waited_from is not None:
                        table.stats.slot_waits += 1
                        table.stats.slot_wait_s += now - waited_from
                    return placement
                waited_from = now if waited_from is None else waited_from
                deadline = table.next_deadline(now)
                changed = self._changed
            with anyio.move_on_after(max(0.0, deadline - now) if deadline is not None else None):
                await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _slot_table(self) -> SlotTable:
        if self._table is not None:
            return self._table
        async with self._lock:
            if self._table is None:
                n = await self._count_slots()
                self._table = SlotTable(n, max_pinned=self.llama.max_pinned_slots)
        return self._table

    async def _count_slots(self) -> int:
        url = self.root_url + "/slots"
        try:
            response = await self._client.get(
                url, headers=self._headers, timeout=self._probe_timeout
            )
        except httpx.HTTPError as exc:
            raise BackendError(
                f"{self.name}: cannot read {url}: {exc!r}", retryable=True, replica=self.name
            ) from exc
        slots = response.json() if response.status_code == 200 else None
        if not isinstance(slots, list) or not slots:
            raise BackendError(
                f"{self.name}: GET {url} answered {response.status_code}; slot placement needs "
                "llama-server's /slots endpoint (on unless --no-slots), or set the dialect "
                "option manage_slots: false",
                replica=self.name,
            )
        return len(slots)

    async def _slot_action(self, slot: Slot, action: str, filename: str) -> dict[str, Any]:
        url = f"{self.root_url}/slots/{slot.id}?action={action}"
        response = await self._client.post(
            url, json={"filename": filename}, headers=self._headers, timeout=self._timeout
        )
        if response.status_code != 200:
            raise BackendError(
                f"{self.name}: {action} of slot {slot.id} answered {response.status_code}: "
                f"{response.text[:300]}",
                replica=self.name,
            )
        data = response.json()
        return data if isinstance(data, dict) else {}

    async def _save(self, table: SlotTable, slot: Slot, program: str, chain: Chain) -> None:
        """Save `slot` (busy: ours for this request), which holds `program`'s sequence
        `chain`, before it is overwritten."""
        filename = _program_file(program)
        try:
            data = await self._slot_action(slot, "save", filename)
        except (BackendError, httpx.HTTPError, ValueError) as exc:
            table.stats.failed_offloads += 1
            _log.warning("%s: could not save slot %d: %s", self.name, slot.id, exc)
            return
        tokens = int(data.get("n_saved") or 0)
        table.stats.saves += 1
        table.stats.saved_tokens += tokens
        table.stats.save_ms += float((data.get("timings") or {}).get("save_ms") or 0.0)
        state = table.programs.get(program)
        if state is not None:  # still waiting on its tool (not released meanwhile)
            state.saved = Saved(filename, chain, tokens)

    async def _restore(self, table: SlotTable, slot: Slot, saved: Saved) -> None:
        try:
            data = await self._slot_action(slot, "restore", saved.filename)
        except (BackendError, httpx.HTTPError, ValueError) as exc:
            table.stats.failed_offloads += 1
            _log.warning("%s: could not restore into slot %d: %s", self.name, slot.id, exc)
            slot.chain = ()  # the server cleared it
            return
        table.stats.restores += 1
        table.stats.restored_tokens += int(data.get("n_restored") or 0)
        table.stats.restore_ms += float((data.get("timings") or {}).get("restore_ms") or 0.0)


__all__ = [
    "Chain",
    "LlamaCppBackend",
    "Placement",
    "Saved",
    "Slot",
    "SlotStats",
    "SlotTable",
    "common_chars",
    "message_chain",
]
