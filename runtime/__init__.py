"""Executing programs: the orchestrator, events, state stores, scheduling and pinning."""

from treadle.runtime.core.errors import NodeError, RunCancelled, RunFailed
from treadle.runtime.core.events import Event
from treadle.runtime.core.store import RunRecord, RunStatus, StateStore
from treadle.runtime.execution.runtime import (
    InvalidInputs,
    InvalidModel,
    RunHandle,
    RunResult,
    Runtime,
)
from treadle.runtime.stores.memory import MemoryStore

__all__ = [
    "Event",
    "InvalidInputs",
    "InvalidModel",
    "MemoryStore",
    "NodeError",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunRecord",
    "RunResult",
    "RunStatus",
    "Runtime",
    "StateStore",
]
