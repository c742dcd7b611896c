"""The run's journal writer: events and finished outputs go to the store in order,
batched (group commit) when several nodes finish at once.

A node's successors start only after its output is durable (`commit` returns then), so the
journal never holds a result computed from an input that a crash could lose.

A store that says it is not durable (`durable = False`, the in-memory store) loses
everything with the process anyway, so ordering its writes buys nothing: its journal is
written in batches of `NON_DURABLE_BATCH` events, and in full when the run ends.
"""

from __future__ import annotations

import anyio

from treadle.runtime.core.events import Event
from treadle.runtime.core.store import StateStore

#: events a non-durable store's journal collects before it writes them
NON_DURABLE_BATCH = 64


class Journal:
    def __init__(self, store: StateStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._durable_store: bool = getattr(store, "durable", True)
        #: the run's events, appended by the run; `log[self._durable:]` is not yet durable
        self.log: list[Event] = []
        self._durable = 0
        self.outputs: dict[str, bytes] = {}
        self._filling = 0  # number of the batch being filled
        self._written = -1  # number of the last batch that is durable
        self._writing = False
        self._flushed: anyio.Event | None = None

    def undurable(self) -> list[Event]:
        """The run's events that are not in the store yet (the next commit writes them)."""
        return self.log[self._durable :]

    def stage(self, node: str, output: bytes) -> None:
        """Add `node`'s output to the next commit (it is not durable until then)."""
        self.outputs[node] = output

    async def commit(
        self, node: str | None = None, output: bytes | None = None, *, final: bool = False
    ) -> None:
        """Make every event so far, and `node`'s `output` if given, durable. `final`
        writes everything, whatever the store."""
        if node is not None and output is not None:
            self.outputs[node] = output
        if (
            not self._durable_store
            and not final
            and len(self.log) - self._durable < NON_DURABLE_BATCH
        ):
            return
        target = self._filling
        while self._written < target:
            if self._writing:
                if self._flushed is None:
                    self._flushed = anyio.Event()
                await self._flushed.wait()
                continue
            self._writing = True
            end = len(self.log)
            events = self.log[self._durable : end]
            batch_outputs, self.outputs = self.outputs, {}
            number = self._filling
            self._filling += 1
            try:
                if events or batch_outputs:
                    await self.store.record(self.run_id, events, batch_outputs)
                self._durable = end
                self._written = number
            except BaseException:
                # keep the batch so that a later commit retries it, in order
                self.outputs = {**batch_outputs, **self.outputs}
                self._filling = number
                raise
            finally:
                self._writing = False
                if self._flushed is not None:
                    flushed, self._flushed = self._flushed, None
                    flushed.set()
