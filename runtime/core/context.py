"""Per-run state shared by every graph scope of a run: ids, the event sequence, the journal,
restored outputs, and the services nodes call (LLM gateway, tools)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from treadle.runtime.core.events import Event
from treadle.runtime.core.journal import Journal

if TYPE_CHECKING:
    from treadle.runtime.nodes.llm import LLMGateway

_now = time.time


#: called synchronously with every event of a run (tracing, metrics, displays)
Listener = Callable[["RunContext", Event], None]


@dataclass
class RunOptions:
    #: stream LLM tokens as `LLMTokens` events (backends that can stream)
    stream_tokens: bool = False
    #: at most this many node attempts run at once in the run (None: no limit)
    max_concurrency: int | None = None
    tenant: str | None = None


class RunContext:
    """Everything one run's node executions share."""

    def __init__(
        self,
        run_id: str,
        journal: Journal,
        gateway: LLMGateway,
        *,
        options: RunOptions,
        restored: dict[str, bytes] | None = None,
        first_seq: int = 1,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self.run_id = run_id
        self.journal = journal
        self.gateway = gateway
        self.options = options
        self.restored = restored or {}
        self._seq = first_seq - 1
        #: every event of this run in this process; the journal persists it incrementally
        self.log: list[Event] = journal.log
        self._listeners = tuple(listeners)
        #: extra HTTP headers per LLM call id, filled by listeners (e.g. trace context)
        self.call_headers: dict[str, dict[str, str]] = {}
        self._changed: anyio.Event | None = None
        self.limiter = (
            anyio.CapacityLimiter(options.max_concurrency) if options.max_concurrency else None
        )
        self.llm_call_counter = 0

    def emit(self, cls: type[Event], *args: Any, **fields: Any) -> Event:
        """Record an event; the fields after (seq, run_id, ts) are given in order or by name."""
        self._seq += 1
        event = cls(self._seq, self.run_id, _now(), *args, **fields)
        self.log.append(event)
        if self._changed is not None:
            changed, self._changed = self._changed, None
            changed.set()
        for listener in self._listeners:
            listener(self, event)
        return event

    async def wait_for_events(self, after: int) -> None:
        """Return once the log holds more than `after` events."""
        while len(self.log) <= after:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
