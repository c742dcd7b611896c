"""Errors a run can end with, and the error a single node attempt raises."""

from __future__ import annotations

import anyio


class NodeError(Exception):
    """A node failed (after its retries). `node` is the node instance id."""

    def __init__(self, node: str, message: str, *, retryable: bool = True):
        super().__init__(f"node {node!r}: {message}")
        self.node = node
        self.reason = message
        self.retryable = retryable


class OutputError(NodeError):
    """A node's output could not be parsed, validated or serialized."""


class RunFailed(Exception):
    """The run ended in failure; `error` says which node and why."""

    def __init__(self, run_id: str, error: str):
        super().__init__(f"run {run_id} failed: {error}")
        self.run_id = run_id
        self.error = error


class RunCancelled(Exception):
    def __init__(self, run_id: str):
        super().__init__(f"run {run_id} was cancelled")
        self.run_id = run_id


def why_call_ended(exc: BaseException) -> str:
    """The error a call's finished event records when `exc` ended it before it answered:
    a cancellation (the node's timeout, or the run's end) or an unexpected exception."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled before it finished"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
