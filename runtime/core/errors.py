"""Errors a run can end with, the error a single node attempt raises, and the value a
caught error becomes (`error_info`)."""

from __future__ import annotations

from treadle.graphs.spec import ErrorInfo


class NodeError(Exception):
    """A node failed (after its retries). `node` is the node instance id."""

    def __init__(self, node: str, message: str, *, retryable: bool = True):
        super().__init__(f"node {node!r}: {message}")
        self.node = node
        self.reason = message
        self.retryable = retryable


class OutputError(NodeError):
    """A node's output could not be parsed, validated or serialized."""


class NodeTimeout(NodeError):
    """A node attempt ran past its `timeout_s`."""


class RunFailure(Exception):
    """A node failed under the `fail` policy: the run (or the map element, loop iteration or
    race branch that ran it) stops. `error` is the failure as a value."""

    def __init__(self, node: str, message: str, error: ErrorInfo | None = None):
        super().__init__(f"node {node!r} failed: {message}")
        self.node = node
        self.message = message
        self.error = error or ErrorInfo(type="RunFailure", message=message, node=node)


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


def error_types(exc: BaseException) -> tuple[str, ...]:
    """The class names an `on_error` handler's `catch` list is matched against: those of
    the exception and of its cause (a `NodeError` raised from a `BackendError` is both)."""
    names: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(names) < 32:
        names.extend(cls.__name__ for cls in type(seen).__mro__ if cls not in (object,))
        seen = seen.__cause__
    return tuple(dict.fromkeys(names))


def describe_error(exc: BaseException) -> str:
    """A failure in one line, as `NodeFailed` events and run errors say it."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, RunFailure):
        return f"{exc.node}: {exc.message}"
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
    if isinstance(exc, RunFailure):
        return exc.error
    return ErrorInfo(
        type=type(exc).__name__, message=describe_error(exc), node=node, attempt=attempt
    )
