"""Errors a run can end with, and the error a single node attempt raises."""

from __future__ import annotations


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
