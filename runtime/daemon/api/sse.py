"""A run's events as Server-Sent Events, resumable from a sequence number.

Each event is one SSE message: `id:` is the event's seq, `event:` its kind, `data:` its
JSON (`Event.to_dict`). A client that reconnects sends the last id it saw (`Last-Event-ID`,
which browsers' EventSource do by themselves, or `?after=`) and gets what followed.

The journal is read first (`XRANGE`), then followed with blocking `XREAD`s on the run's
event stream until the run's record is terminal. Blocking reads hold a Redis connection
each, so they use a pool of their own (`stream_redis`) and the API caps the number of
streams it serves at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
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
_BATCH = 500


def sse_message(event: Event) -> bytes:
    # compact JSON has no raw newlines, so the data fits on one `data:` line
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {codec.encode_event(event)}\n\n".encode()


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
    last = after
    try:
        for event in await store.read_events(run_id, after):
            yield sse_message(event)
            last = event.seq
        if not follow:
            return
        key = store.keys.events(run_id)
        finishing = False
        while True:
            record = await store.get_run(run_id)
            if record is None or record.status in TERMINAL:
                # the end is written after the journal: what is left is already there
                for event in await store.read_events(run_id, last):
                    yield sse_message(event)
                return
            # right after RunFinished the record turns terminal within milliseconds
            block_ms = 200 if finishing else int(keepalive_s * 1000)
            resp: Any = await stream_redis.xread({key: f"{last}-0"}, count=_BATCH, block=block_ms)
            if not resp:
                if not finishing:
                    yield b": keepalive\n\n"
                continue
            streams = resp.values() if isinstance(resp, dict) else [e for _k, e in resp]
            for entries in streams:
                for _entry_id, fields in entries:
                    event = codec.decode_event(fields[b"e"])
                    if event.seq <= last:
                        continue
                    yield sse_message(event)
                    last = event.seq
                    finishing = finishing or isinstance(event, RunFinished)
    except (RedisError, OSError) as exc:
        # the response has started: all we can do is end it; the client resumes from `last`
        log.warning("event stream of run %s ended early: %s", run_id, exc)
