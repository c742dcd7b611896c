"""Errors a run can end with, the error a single node attempt raises (the `RunError`
sub-tree of `treadle.errors`), and the value a caught error becomes (`error_info`)."""

from __future__ import annotations

import anyio

from treadle.errors import RunError
from treadle.graphs.spec import ErrorInfo


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


class NodeTimeout(NodeError):
    """A node attempt ran past its `timeout_s`."""


class RunFailed(RunError):
    """The run ended in failure; `error` says which node failed and why.

    `Runtime.run` and `RunResult.raise_for_status` raise it to the caller. Inside a run, the
    orchestrator raises it (`RunFailed.at_node`) when a node fails for good under the `fail`
    policy, or an output the graph owes is unavailable: the run stops there, and `node` and
    `reason` say where and why (None and `error` when only the run's record is known), and
    `info` is the failure as a value (what a map with `max_failures` reports for the element,
    or an outer `on_error` handler receives).

    A node that runs others catches it from them: a map element's, a race branch's."""

    def __init__(
        self,
        run_id: str,
        error: str,
        *,
        node: str | None = None,
        reason: str | None = None,
        info: ErrorInfo | None = None,
    ):
        super().__init__(f"run {run_id} failed: {error}")
        self.run_id = run_id
        self.error = error
        self.node = node
        self.reason = error if reason is None else reason
        self.info = info

    @classmethod
    def at_node(
        cls, run_id: str, node: str, reason: str, info: ErrorInfo | None = None
    ) -> RunFailed:
        """Node `node` of run `run_id` failed for good: the run stops."""
        return cls(run_id, f"node {node!r} failed: {reason}", node=node, reason=reason, info=info)


class RunCancelled(RunError):
    """The run was cancelled before it finished."""

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


def error_types(exc: BaseException) -> tuple[str, ...]:
    """The class names an `on_error` policy's `catch` list is matched against: those of
    the exception and of its cause (a `NodeError` raised from a `BackendError` is both)."""
    names: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(names) < 64:
        names.extend(cls.__name__ for cls in type(seen).__mro__ if cls is not object)
        seen = seen.__cause__
    return tuple(dict.fromkeys(names))


def describe_error(exc: BaseException) -> str:
    """A failure in one line, as `NodeFailed` events and run errors say it."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, RunFailed):  # no node: an output the graph owes is unavailable
        return exc.reason if exc.node is None else f"{exc.node}: {exc.reason}"
    if isinstance(exc, NodeError):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_info(exc: BaseException, node: str, attempt: int) -> ErrorInfo:
    """A node's last failure as a value: what its error handler receives (`$error`) and
    what a map with `max_failures` reports per element. A failure inside a nested graph
    names the inner node that failed."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, RunFailed) and exc.info is not None:
        return exc.info
    return ErrorInfo(
        type=type(exc).__name__, message=describe_error(exc), node=node, attempt=attempt
    )
