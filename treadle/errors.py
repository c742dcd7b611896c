"""The root of every error treadle raises, and one base per part of the house.

`except treadle.TreadleError` catches whatever treadle itself raised; a sub-tree's base
catches one part of it. Classes that were `ValueError`, `KeyError` or `RuntimeError` before
there was a root keep that builtin as a second base, so older `except ValueError:` code
still works. This module is the lowest layer of the package: it imports nothing of
treadle's, so every layer (tools and backends included) may raise from it.

    TreadleError
    ├── GraphError                 a program that cannot be built, loaded or validated
    │   ├── GraphValidationError       graphs.compile: every problem of a graph, listed
    │   ├── WorkflowFileError          graphs.files.document: `FILE:LINE:COL: FIELD: WHAT`
    │   ├── TypeRefError               graphs.files.typeref: a type string or import path
    │   │   └── ImportPathError            its module or attribute cannot be imported
    │   └── ProgramNotFound            cli.programs: names no workflow file or graph object
    ├── RunError                   a run that cannot start, or did not succeed
    │   ├── InvalidInputs              runtime: the inputs do not match the graph's
    │   ├── InvalidModel               runtime: a model alias's backend cannot be built
    │   ├── RunFailed                  the run ended in failure: which node, and why
    │   ├── RunCancelled               the run was cancelled
    │   ├── NodeError                  one node attempt failed (retried per its policy)
    │   │   ├── OutputError                its output cannot be parsed, validated, serialized
    │   │   └── NodeTimeout                it ran past its `timeout_s`
    │   ├── InputRejected              an answer to a waiting run does not fit its request
    │   ├── InputConflict              the run does not wait for that answer (any more)
    │   └── ArgumentResolutionError    planner: a `$N` reference cannot be substituted
    ├── BackendError               a model backend gave no usable answer (`retryable`)
    │   ├── NoReplicaAvailable         dispatch.routing: every replica is out of routing
    │   ├── MetricsFormatError         openai_compat: a server's /metrics is unreadable
    │   └── SimulatorFailure, DuplicateRequestId, ContextLengthExceeded, OutOfBlocks:
    │                                  the simulated engine
    ├── ToolError                  a tool call failed; the message is what the model is told
    │   ├── ToolArgumentError          the arguments do not match the tool's schema
    │   ├── ToolTimeout                the tool did not return in time
    │   └── CalculatorError            the calculator refuses the expression
    ├── StoreError                 the state store refuses or lost something
    │   ├── RunNotFound                no such run in the store
    │   ├── JournalError               events that do not continue the run's journal
    │   └── LeaseLost                  another worker holds the run's lease now
    ├── DaemonError                the multi-tenant daemon: its API, workers and client
    │   ├── ApiError                   an HTTP error answer (status, code, message)
    │   ├── NotFound, Conflict, InvalidRequest   daemon.runs: 404, 409, 422
    │   ├── DefinitionError            a workflow definition cannot be registered (422)
    │   ├── CheckFailed                the definition checker did not answer in time (503)
    │   ├── AllowListViolation         the import allow-list refuses a definition
    │   ├── TenantError                a tenant operation that cannot be done
    │   ├── QuotaExceeded              a tenant's quota is used up (429, `retry_after_s`)
    │   ├── ProgramError               a worker cannot load a run's program: the run fails
    │   ├── RunInterrupted             a worker stopped a run; its writes are refused
    │   ├── LoginRequired              the web view's request has no valid session
    │   └── ClientError                what `DaemonClient` raises for an error answer
    ├── GatewayError               `treadle gateway` refused or could not serve a request
    │   ├── GatewayConfigError         runtime.gateway.config: flags or a config file
    │   ├── HintError                  openai_compat.hint_wire: malformed treadle hints
    │   └── CallWithdrawn              runtime.gateway.scheduling: its program was closed
    └── SetupError                 what was asked needs something this install lacks
        ├── TracingUnavailable         the OpenTelemetry packages
        ├── MetricsUnavailable         prometheus-client
        ├── RedisUnavailable           a `redis-server` binary (treadle.testing)
        └── LlamaServerUnavailable     a `llama-server` binary, or its build (treadle.testing)

Each class lives next to the code that raises it (the module named above); this module
holds the root and the bases. `BackendError` and `ToolError` are bases *and* concrete: the
backends and tools raise them directly. docs/errors.md says the same for users.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "DaemonError",
    "GatewayError",
    "GraphError",
    "RunError",
    "SetupError",
    "StoreError",
    "ToolError",
    "TreadleError",
]


class TreadleError(Exception):
    """The root: every error treadle raises derives from it."""


class GraphError(TreadleError):
    """A program that cannot be built, loaded or validated (graphs, workflow files)."""


class RunError(TreadleError):
    """A run that cannot start or did not succeed, or one of its nodes that failed."""


class BackendError(TreadleError):
    """A backend failed to produce a usable response.

    `retryable` says whether the same request may succeed on another attempt or replica;
    `replica` names the replica that failed, where there is one.
    """

    def __init__(self, message: str, *, retryable: bool = False, replica: str | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.replica = replica


class ToolError(TreadleError):
    """A tool call failed. The message is what the model (or the run) is told."""

    def __init__(self, tool: str, message: str):
        super().__init__(f"tool {tool!r}: {message}")
        self.tool = tool
        self.reason = message


class StoreError(TreadleError):
    """The state store refuses a write or lacks what was asked for."""


class DaemonError(TreadleError):
    """The daemon (its HTTP API, workers, tenants, quotas) or its client refused something."""


class GatewayError(TreadleError):
    """`treadle gateway` refused a request, or could not serve it (its configuration)."""


class SetupError(TreadleError):
    """What was asked needs something this installation lacks (a package, a binary)."""
