"""Live events: a run's events reach the daemon's event streams as they happen, not when
its journal is next committed.

The journal (`treadle:{run}:events`) is written when a node's output is made durable, so a
node that runs for a minute shows nothing for a minute there. Every worker therefore also
appends each event, as it is emitted, to the run's *live stream* `treadle:{run}:live`: a
Redis stream laid out like the journal (entry id `<seq>-0`, field `e`), capped at
`LIVE_MAXLEN` entries and expiring `LIVE_TTL_S` after its last write (`LIVE_END_TTL_S`
once the run has finished). `LiveEvents.listener` only queues the event; `run()` writes
whatever has queued since its last round trip in one pipeline, so an event leaves within
one round trip and a burst (a token stream, a fan-out) costs one.

The live stream is lossy by design and changes nothing that is durable: a failed write is
not retried (the journal has the event, a little later), and the API's event stream
(`treadle.runtime.daemon.api.sse`) reads both streams and delivers by seq, the journal
filling whatever the live stream missed; a client resumes from the journal with
`Last-Event-ID`.

A worker that dies after writing live events its journal never got leaves seqs that
clients have seen; the run's next worker numbers its events after them (`live_floor`), so
a client that saw them misses nothing that follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from treadle.runtime.core.context import RunContext
from treadle.runtime.core.events import Event, RunFinished
from treadle.runtime.stores import codec
from treadle.runtime.stores.redis import RedisKeys

log = logging.getLogger(__name__)

#: entries a live stream keeps (approximately: Redis trims whole nodes); readers that fall
#: further behind catch up from the journal
LIVE_MAXLEN = 1000
#: a live stream expires this long after its last write ...
LIVE_TTL_S = 3600.0
#: ... and this long after its run's `RunFinished` (streams still reading it finish from
#: the journal anyway)
LIVE_END_TTL_S = 60.0


def live_floor(entries: Any) -> int:
    """The seq of the newest live event, from `XREVRANGE live + - COUNT 1` (0: none)."""
    if not entries:
        return 0
    entry_id = entries[0][0]
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


class LiveEvents:
    """A worker's writer of live streams (module docstring). `publishes(run_id)` says
    whether a run's events are still this worker's to write (not once it has interrupted
    the run, e.g. after losing its lease: the new owner writes them)."""

    def __init__(self, redis: Redis, keys: RedisKeys, *, publishes: Callable[[str], bool]) -> None:
        self.redis = redis
        self.keys = keys
        self._publishes = publishes
        self._queued: dict[str, list[Event]] = {}
        self._wake = anyio.Event()
        #: events written, and events dropped (a write failed or was refused)
        self.written = 0
        self.dropped = 0

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
        """Write what is queued, as soon as it is, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        if not self._queued:
            return
        batch, self._queued = self._queued, {}
        count = sum(len(events) for events in batch.values())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id, events in batch.items():
                    key = self.keys.live(run_id)
                    for event in events:
                        pipe.xadd(
                            key,
                            {"e": codec.encode_event(event)},
                            id=f"{event.seq}-0",
                            maxlen=LIVE_MAXLEN,
                            approximate=True,
                        )
                    ended = isinstance(events[-1], RunFinished)
                    pipe.pexpire(key, int(1000 * (LIVE_END_TTL_S if ended else LIVE_TTL_S)))
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            # lossy by design: the journal has these events, a little later
            self.dropped += count
            log.debug("live events not written (%d): %s", count, exc)
            return
        # a refused XADD (an id not above the stream's last: a worker that lost the run)
        refused = sum(1 for r in results if isinstance(r, Exception))
        self.dropped += refused
        self.written += count - refused
