"""A run's events as Server-Sent Events, live, resumable from a sequence number.

Each event is one SSE message: `id:` is the event's seq, `event:` its kind, `data:` its
JSON (`Event.to_dict`). A client that reconnects sends the last id it saw (`Last-Event-ID`,
which browsers' EventSource do by themselves, or `?after=`) and gets what followed.

The journal is read first (`XRANGE`); then the stream follows two Redis streams with one
blocking `XREAD`: the journal, and the run's live stream, where workers put each event as
it happens (`treadle.runtime.daemon.live`). Events go out in seq order, each once:

- a live event that continues the stream (seq = last + 1) goes out at once;
- a live event after a gap (the live stream lost one: a failed write, a trim) waits in
  `_Merge.early` until the journal brings what is missing;
- a journal event goes out with the early ones before it; the journal is complete up to
  its last entry, so a seq it skips will never come (a worker that died after writing it
  live only; the next worker numbers after it).

The stream ends once the run's record is terminal (checked after `RunFinished`, and every
`POLL_S` while nothing happens: a run cancelled before it started has no events). Blocking
reads hold a Redis connection each, so they use a pool of their own (`stream_redis`) and
the API caps the number of streams it serves at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from treadle.runtime.core.events import Event, RunFinished
from treadle.runtime.core.store import TERMINAL
from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import RedisStore

log = logging.getLogger(__name__)

#: how soon a client reconnects after a dropped stream (ms), sent once per stream
RETRY_MS = 1000
#: while no event comes, the run's record is looked at this often (s)
POLL_S = 2.0
_BATCH = 500
#: live events held back behind a gap at most (beyond: dropped, the journal has them)
_EARLY_MAX = 10_000


def sse_message(event: Event) -> bytes:
    # compact JSON has no raw newlines, so the data fits on one `data:` line
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {codec.encode_event(event)}\n\n".encode()


class _Merge:
    """Orders a run's journal and live events into one stream of seqs (module docstring)."""

    def __init__(self, after: int) -> None:
        #: the last seq sent
        self.last = after
        #: how far each Redis stream has been read
        self.journal_read = after
        self.live_read = after
        self.early: dict[int, Event] = {}
        self.finished = False

    def from_journal(self, event: Event) -> Iterator[Event]:
        self.journal_read = max(self.journal_read, event.seq)
        if event.seq <= self.last:
            return
        if self.early:
            yield from self._before(event.seq)
        yield self._sent(event)
        yield from self._continued()

    def from_live(self, event: Event) -> Iterator[Event]:
        self.live_read = max(self.live_read, event.seq)
        if event.seq <= self.last:
            return
        if event.seq == self.last + 1:
            yield self._sent(event)
            yield from self._continued()
        elif len(self.early) < _EARLY_MAX:
            self.early[event.seq] = event

    def rest(self, journal: list[Event]) -> Iterator[Event]:
        """The run is over: what the journal has after `last`, with what came live only."""
        for event in journal:
            yield from self.from_journal(event)
        yield from self._before(None)

    def _sent(self, event: Event) -> Event:
        self.last = event.seq
        self.finished = self.finished or isinstance(event, RunFinished)
        return event

    def _before(self, seq: int | None) -> Iterator[Event]:
        for held in sorted(s for s in self.early if seq is None or s < seq):
            event = self.early.pop(held)
            if held > self.last:
                yield self._sent(event)

    def _continued(self) -> Iterator[Event]:
        while self.last + 1 in self.early:
            yield self._sent(self.early.pop(self.last + 1))
        for stale in [s for s in self.early if s <= self.last]:
            del self.early[stale]


async def event_stream(
    store: RedisStore,
    stream_redis: Redis,
    run_id: str,
    *,
    after: int = 0,
    follow: bool = True,
    keepalive_s: float = 15.0,
) -> AsyncIterator[bytes]:
    """The SSE body for `run_id` from seq `after` on (the caller checked the tenant)."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    merge = _Merge(after)
    try:
        for event in await store.read_events(run_id, after):
            for out in merge.from_journal(event):
                yield sse_message(out)
        if not follow:
            return
        journal_key, live_key = store.keys.events(run_id), store.keys.live(run_id)
        quiet_since = time.monotonic()
        look = True  # at the record
        while True:
            if look:
                record = await store.get_run(run_id)
                if record is None or record.status in TERMINAL:
                    # the end is written after the journal: what is left is already there
                    for out in merge.rest(await store.read_events(run_id, merge.last)):
                        yield sse_message(out)
                    return
            # right after RunFinished the record turns terminal within milliseconds
            block_s = 0.2 if merge.finished else min(POLL_S, keepalive_s)
            cursors: dict[Any, Any] = {
                journal_key: f"{merge.journal_read}-0",
                live_key: f"{merge.live_read}-0",
            }
            resp: Any = await stream_redis.xread(cursors, count=_BATCH, block=int(block_s * 1000))
            look = merge.finished or not resp
            if not resp:
                if time.monotonic() - quiet_since >= keepalive_s:
                    quiet_since = time.monotonic()
                    yield b": keepalive\n\n"
                continue
            quiet_since = time.monotonic()
            for key, entries in resp.items() if isinstance(resp, dict) else resp:
                is_journal = (key.decode() if isinstance(key, bytes) else key) == journal_key
                for _entry_id, fields in entries:
                    event = codec.decode_event(fields[b"e"])
                    ordered = merge.from_journal(event) if is_journal else merge.from_live(event)
                    for out in ordered:
                        yield sse_message(out)
    except (RedisError, OSError) as exc:
        # the response has started: all we can do is end it; the client resumes from `last`
        log.warning("event stream of run %s ended early: %s", run_id, exc)
