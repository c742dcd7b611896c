"""Live events: a run's events reach the daemon's event streams as they happen, not when
its journal is next committed.

The journal (`treadle:{run}:events`) is written when a node's output is made durable, so a
node that runs for a minute shows nothing for a minute there. Every worker therefore also
publishes each event, as it is emitted, on the run's channel `treadle:{run}:live` (Redis
Pub/Sub). `LiveEvents.listener` only queues the event; `run()` publishes whatever has
queued since its last round trip, one message per run (its events' JSON, one per line),
all in one pipeline: an event leaves within one round trip, and a burst (a token stream, a
fan-out) costs one. Pub/Sub keeps nothing, so it costs Redis no memory and no write to its
append-only file (with `appendfsync always`, a stream of live events would wait for an
fsync per write; see docs/web-view.md for the measurements).

A stream that subscribes while a node runs has missed what was published since the last
commit, and the journal does not have it yet: it asks on the replay channel
(`treadle:live:replay`, the run id), and the run's worker publishes the run's events that
are not durable yet once more (`replay`).

The channel is lossy by design and changes nothing that is durable: a message published
while no API process listens, or lost with a connection, is simply not seen; the API's
event stream (`treadle.runtime.daemon.api.sse`) delivers by seq and fills any gap from the
journal, and a client resumes from the journal with `Last-Event-ID`.

Seqs that clients saw live must never be given to other events: a worker that dies after
publishing events its journal never got would otherwise leave those seqs to the run's next
worker, and a client that saw them would skip that worker's first events. So a worker
*reserves* seqs before publishing them: the meta field `live_seq` holds the highest seq it
may publish (raised `RESERVE` at a time, in the same pipeline as the publish that needs
it), and a worker that takes over a run that did not end cleanly numbers after it
(`first_free_seq`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from treadle.runtime.core.context import RunContext
from treadle.runtime.core.events import Event, RunFinished, RunWaiting
from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import RedisKeys

log = logging.getLogger(__name__)

#: how long the publisher waits after an event for more before it publishes (s): a node's
#: events come in bursts (finished, then its successors ready and started), and one round
#: trip for a burst costs the worker far less CPU than one per event
LINGER_S = 0.002
#: seqs reserved at a time (a worker taking over a crashed run may skip up to this many)
RESERVE = 256


def first_free_seq(last_seq: int, live_seq: int, last_event: Event | None) -> int:
    """The seq after which a run's next execution numbers its events: the journal's last,
    or, when the journal does not end with the run parking or finishing (its worker died),
    also after every seq its worker may have published (`live_seq`)."""
    if last_event is None or not isinstance(last_event, RunFinished | RunWaiting):
        return max(last_seq, live_seq)
    return last_seq


class LiveEvents:
    """A worker's publisher of live events (module docstring). `publishes(run_id)` says
    whether a run's events are still this worker's to publish (not once it has interrupted
    the run, e.g. after losing its lease: the new owner publishes them)."""

    def __init__(self, redis: Redis, keys: RedisKeys, *, publishes: Callable[[str], bool]) -> None:
        self.redis = redis
        self.keys = keys
        self._publishes = publishes
        self._queued: dict[str, list[Event]] = {}
        #: per run in progress: the highest seq reserved (`start`; `forget` when done)
        self._reserved: dict[str, int] = {}
        self._wake = anyio.Event()
        #: events published, and events dropped (a publish failed)
        self.published = 0
        self.dropped = 0

    def start(self, run_id: str, first_seq: int) -> None:
        """The run executes here, numbering its events after `first_seq - 1`."""
        self._reserved[run_id] = first_seq - 1

    def forget(self, run_id: str) -> None:
        self._reserved.pop(run_id, None)

    def replay(self, run_id: str, events: list[Event]) -> None:
        """Publish `events` (the run's events not yet journaled) again, for an event stream
        that has just subscribed: the ones published before it did are not in the journal."""
        if not events or not self._publishes(run_id):
            return
        queued = {e.seq: e for e in (*events, *self._queued.get(run_id, ()))}
        self._queued[run_id] = [queued[seq] for seq in sorted(queued)]
        self._wake.set()

    def listener(self, ctx: RunContext, event: Event) -> None:
        run_id = ctx.run_id
        if not self._publishes(run_id):
            return
        queued = self._queued.get(run_id)
        if queued is None:
            self._queued[run_id] = [event]
        else:
            queued.append(event)
        self._wake.set()

    async def run(self) -> None:
        """Publish what is queued, as soon as it is, until cancelled."""
        while True:
            await self._wake.wait()
            await anyio.sleep(LINGER_S)  # what the run (and other runs) emit next goes too
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        if not self._queued:
            return
        batch, self._queued = self._queued, {}
        count = sum(len(events) for events in batch.values())
        raised: dict[str, int] = {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id, events in batch.items():
                    top = events[-1].seq
                    reserved = self._reserved.get(run_id)
                    if reserved is not None and top > reserved:
                        # reserved before published: in this pipeline, ahead of the PUBLISH
                        raised[run_id] = top + RESERVE
                        pipe.hset(self.keys.meta(run_id), "live_seq", raised[run_id])
                    payload = "\n".join(codec.encode_event(e) for e in events)
                    pipe.publish(self.keys.live(run_id), payload)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # lossy by design: the journal has these events, a little later
            self.dropped += count
            log.debug("live events not published (%d): %s", count, exc)
            return
        for run_id, top in raised.items():
            if run_id in self._reserved:
                self._reserved[run_id] = top
        self.published += count
