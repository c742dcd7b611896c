"""The run's journal writer: events and finished outputs go to the store in order,
batched (group commit) when several nodes finish at once.

A node's successors start only after its output is durable (`commit` returns then), so the
journal never holds a result computed from an input that a crash could lose.
"""

from __future__ import annotations

from typing import Any

import anyio

from treadle.runtime.events import Event
from treadle.runtime.store import StateStore


class Journal:
    def __init__(self, store: StateStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.events: list[Event] = []
        self.outputs: dict[str, bytes] = {}
        self._filling = 0  # number of the batch being filled
        self._written = -1  # number of the last batch that is durable
        self._writing = False
        self._flushed: anyio.Event | None = None

    def add(self, event: Event) -> None:
        self.events.append(event)

    async def commit(self, outputs: dict[str, bytes] | None = None) -> None:
        """Make everything added so far (and `outputs`) durable."""
        if outputs:
            self.outputs.update(outputs)
        target = self._filling
        while self._written < target:
            if self._writing:
                if self._flushed is None:
                    self._flushed = anyio.Event()
                await self._flushed.wait()
                continue
            self._writing = True
            events, self.events = self.events, []
            batch_outputs, self.outputs = self.outputs, {}
            number = self._filling
            self._filling += 1
            try:
                if events or batch_outputs:
                    await self.store.record(self.run_id, events, batch_outputs)
                self._written = number
            except BaseException:
                # put the batch back so a later commit retries it in order
                self.events[:0] = events
                self.outputs = {**batch_outputs, **self.outputs}
                self._filling = number
                raise
            finally:
                self._writing = False
                if self._flushed is not None:
                    flushed, self._flushed = self._flushed, None
                    flushed.set()

    def pending(self) -> dict[str, Any]:
        return {"events": len(self.events), "outputs": len(self.outputs)}
