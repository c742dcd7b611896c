"""Executing programs: the orchestrator, events, state stores, scheduling and pinning."""

from treadle.runtime.errors import NodeError, RunCancelled, RunFailed
from treadle.runtime.events import Event
from treadle.runtime.runtime import InvalidInputs, RunHandle, RunResult, Runtime
from treadle.runtime.store import RunRecord, StateStore
from treadle.runtime.stores.memory import MemoryStore

__all__ = [
    "Event",
    "InvalidInputs",
    "MemoryStore",
    "NodeError",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunRecord",
    "RunResult",
    "Runtime",
    "StateStore",
]
