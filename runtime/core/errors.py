"""Errors a run can end with, and the error a single node attempt raises (the `RunError`
sub-tree of `treadle.errors`)."""

from __future__ import annotations

from treadle.errors import RunError


class NodeError(RunError):
    """A node attempt failed; the node's policy decides whether it is tried again.
    `node` is the node instance id, `reason` what went wrong."""

    def __init__(self, node: str, message: str, *, retryable: bool = True):
        super().__init__(f"node {node!r}: {message}")
        self.node = node
        self.reason = message
        self.retryable = retryable


class OutputError(NodeError):
    """A node's output could not be parsed, validated or serialized."""


class RunFailed(RunError):
    """The run ended in failure; `error` says which node failed and why.

    `Runtime.run` and `RunResult.raise_for_status` raise it to the caller. Inside a run, the
    orchestrator raises it (`RunFailed.at_node`) when a node fails for good under the `fail`
    policy, or an output the graph owes is unavailable: the run stops there, and `node` and
    `reason` say where and why (None and `error` when only the run's record is known)."""

    def __init__(
        self, run_id: str, error: str, *, node: str | None = None, reason: str | None = None
    ):
        super().__init__(f"run {run_id} failed: {error}")
        self.run_id = run_id
        self.error = error
        self.node = node
        self.reason = error if reason is None else reason

    @classmethod
    def at_node(cls, run_id: str, node: str, reason: str) -> RunFailed:
        """Node `node` of run `run_id` failed for good: the run stops."""
        return cls(run_id, f"node {node!r} failed: {reason}", node=node, reason=reason)


class RunCancelled(RunError):
    """The run was cancelled before it finished."""

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id} was cancelled")
        self.run_id = run_id
