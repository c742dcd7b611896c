"""A run's events as Server-Sent Events, live, resumable from a sequence number.

Each event is one SSE message: `id:` is the event's seq, `event:` its kind, `data:` its
JSON (`Event.to_dict`). A client that reconnects sends the last id it saw (`Last-Event-ID`,
which browsers' EventSource do by themselves, or `?after=`) and gets what followed.

The stream subscribes to the run's live channel (where workers publish each event as it
happens: `treadle.runtime.daemon.live`), reads the journal (`XRANGE`), asks the run's
worker for the events the journal does not have yet (the replay channel), and from then on
sends what the channel brings, reading the journal again where the channel missed
something. Events go out in seq order, each once:

- a live event that continues the stream (seq = last + 1) goes out at once;
- a live event after a gap (the channel lost one) waits in `_Merge.early` while the
  journal is read every `GAP_POLL_S` until it brings what is missing;
- a journal event goes out with the early ones before it; the journal is complete up to
  its last entry, so a seq it skips will never come (a worker that died after publishing
  it; the next worker numbers after it).

The journal and the run's record are also read every `POLL_S` while the channel is quiet
(workers without live events; a run cancelled before it started has no events at all),
and the stream ends once the record is terminal. A stream holds one Redis connection (its
subscription) from a pool of its own (`stream_redis`), and the API caps the number of
streams it serves at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from treadle.runtime.core.events import Event, RunFinished
from treadle.runtime.core.store import TERMINAL
from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import RedisStore

log = logging.getLogger(__name__)

#: how soon a client reconnects after a dropped stream (ms), sent once per stream
RETRY_MS = 1000
#: while the live channel is quiet, the journal and the run's record are read this often (s)
POLL_S = 1.0
#: while a live event waits for one the channel missed, the journal is read this often (s)
GAP_POLL_S = 0.1
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
        #: how far the journal has been read
        self.journal_read = after
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
    if not follow:
        for event in await store.read_events(run_id, after):
            for out in merge.from_journal(event):
                yield sse_message(out)
        return
    pubsub = stream_redis.pubsub(ignore_subscribe_messages=True)
    try:
        # subscribed before the journal is read: nothing published after that read is missed
        await pubsub.subscribe(store.keys.live(run_id))
        now = time.monotonic()
        next_look = quiet_since = now  # the record is looked at once at the start
        next_read = now + POLL_S
        for event in await store.read_events(run_id, after):
            for out in merge.from_journal(event):
                yield sse_message(out)
        # what was published before the subscription and is not journaled yet: the run's
        # worker publishes it again
        await store.client.publish(store.keys.replay_channel(), run_id)
        while True:
            now = time.monotonic()
            if merge.finished or now >= next_look:
                next_look = now + POLL_S
                record = await store.get_run(run_id)
                if record is None or record.status in TERMINAL:
                    # the end is written after the journal: what is left is already there
                    for out in merge.rest(await store.read_events(run_id, merge.last)):
                        yield sse_message(out)
                    return
            if merge.early or now >= next_read:
                next_read = now + POLL_S
                for event in await store.read_events(run_id, merge.journal_read):
                    for out in merge.from_journal(event):
                        yield sse_message(out)
            # right after RunFinished the record turns terminal within milliseconds
            wait_s = GAP_POLL_S if merge.early else 0.2 if merge.finished else POLL_S
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
            if message is None or message.get("type") != "message":
                if time.monotonic() - quiet_since >= keepalive_s:
                    quiet_since = time.monotonic()
                    yield b": keepalive\n\n"
                continue
            quiet_since = time.monotonic()
            for line in bytes(message["data"]).split(b"\n"):
                for out in merge.from_live(codec.decode_event(line)):
                    yield sse_message(out)
    except (RedisError, OSError) as exc:
        # the response has started: all we can do is end it; the client resumes from `last`
        log.warning("event stream of run %s ended early: %s", run_id, exc)
    finally:
        with anyio.CancelScope(shield=True):
            await pubsub.aclose()
