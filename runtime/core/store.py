"""`StateStore`: where runs, their journal of events, and finished node outputs live.

Checkpoints are deltas: `record` appends a batch of events and the outputs of the nodes
that just finished (JSON bytes, keyed by node instance), written once and never rewritten.
A run's record plus its outputs are enough to resume it without re-running finished nodes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from treadle.errors import StoreError
from treadle.runtime.core.events import Event
from treadle.runtime.core.waiting import InputRequest

#: every status a run can have, in a store's record and in a `RunResult`:
#: - "pending": created, not started (the daemon's record stays so until the run ends; its
#:   API reports a pending run with events as "running");
#: - "running": executing, or resumed;
#: - "waiting": parked until a person answers its requests for input (`pending_inputs`);
#:   it holds nothing meanwhile and goes on when answered (or at a request's deadline);
#: - "interrupted": stopped before it ended (Ctrl-C, a worker shutting down); its finished
#:   nodes are in the journal and it can be resumed;
#: - "succeeded", "failed", "cancelled": ended (`TERMINAL`); never changed again.
RunStatus = Literal[
    "pending", "running", "waiting", "interrupted", "succeeded", "failed", "cancelled"
]
TERMINAL: frozenset[RunStatus] = frozenset({"succeeded", "failed", "cancelled"})
#: beyond every event's seq (SQLite's integers and Redis stream ids stop at 2**63 - 1 and
#: 2**64 - 1): reading after it finds nothing, whatever number a client sent
MAX_SEQ = 2**63 - 1


class RunRecord(BaseModel):
    """What a store knows about one run besides its journal."""

    run_id: str
    graph: str
    status: RunStatus = "pending"
    tenant: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    #: how to find the program again on resume (a workflow file path, a registered name)
    source: str | None = None
    meta: dict[str, str] = Field(default_factory=dict)
    #: while `waiting`: the questions the run waits on
    pending_inputs: list[InputRequest] = Field(default_factory=list)


class RunNotFound(StoreError, KeyError):
    """No run with this id is in the store."""


@runtime_checkable
class StateStore(Protocol):
    async def create_run(self, record: RunRecord) -> None: ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def update_run(self, run_id: str, **changes: Any) -> None:
        """Set fields of the run record (raises `RunNotFound`)."""
        ...

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Newest first."""
        ...

    async def run_ids_with_prefix(self, prefix: str, *, limit: int = 2) -> list[str]:
        """Ids of runs that start with `prefix`, at most `limit`, in no given order: how a
        command line finds a run by the first characters of its id (two tell a unique
        prefix from an ambiguous one)."""
        ...

    async def record(
        self, run_id: str, events: Sequence[Event], outputs: Mapping[str, bytes] | None = None
    ) -> None:
        """Append events and finished outputs to the run's journal, all or nothing."""
        ...

    async def load_outputs(self, run_id: str) -> dict[str, bytes]: ...

    async def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        """Events with `seq > after_seq`, in order."""
        ...

    async def close(self) -> None: ...
