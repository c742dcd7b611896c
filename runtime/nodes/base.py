"""`NodeExecutor`: how one kind of node runs, and what the orchestrator hands it.

Each kind of `treadle.graphs.kinds` has its executor in `treadle.runtime.nodes.<kind name>`
(module-level `EXECUTOR`); `treadle.runtime.nodes.registry` finds them. The orchestrator
(`treadle.runtime.execution.orchestrator`) stays generic: it resolves a node's inputs,
applies its options (retries, timeout, error policy, concurrency), records its output,
and in between calls `executor.run(NodeCall(...))` — or, for a quick synchronous node,
the plain function `executor.inline(spec)` gives it, on the hot path without a task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from treadle.graphs.compiled import CompiledGraph, CompiledNode, LLMFacts
from treadle.graphs.spec import NodeSpec
from treadle.runtime.core.context import RunContext

S = TypeVar("S", bound=NodeSpec)


class Skipped:
    """A node instance that did not produce an output, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Scope(Protocol):
    """The graph scope a node runs in (the orchestrator's `GraphScope`): what executors that
    run other nodes (a map's elements, a subgraph, a loop's iterations, a race's branches)
    need from it."""

    @property
    def graph(self) -> CompiledGraph: ...

    def evaluate(self, binding: Any) -> Any:
        """The value of a binding in this scope (a reference to a settled node or input)."""

    def runs_inline(self, node: CompiledNode) -> bool:
        """Whether `node` runs synchronously in the caller's task."""

    async def run_element(
        self, node: CompiledNode, instance: str, item: Any = None, index: int | None = None
    ) -> Any:
        """Run `node` (a map's inner node, a race's branch) as instance `instance` with
        `$item` and `$index` bound to `item` and `index`, under its options, its output
        journaled: its output, or `Skipped`. Raises `RunFailed` when it fails under the
        `fail` policy, `InputPending` when it waits for human input."""

    async def run_graph(self, graph: CompiledGraph, inputs: dict[str, Any], prefix: str) -> Any:
        """Run a nested graph in this run, its node instances named `prefix + id`."""


@dataclass(slots=True)
class NodeCall(Generic[S]):
    """One attempt of one node instance."""

    ctx: RunContext
    spec: S
    node: CompiledNode
    #: the node instance id in the run's events and journal (`m[2]`, `sub/x`, ...)
    instance: str
    inputs: dict[str, Any]
    attempt: int
    scope: Scope

    @property
    def llm_facts(self) -> LLMFacts | None:
        return self.scope.graph.facts.llm.get(self.node.id)


class NodeExecutor(ABC, Generic[S]):
    """Runs the nodes of one kind."""

    #: the spec class (`treadle.graphs.kinds`) this executor runs
    spec: type[S]
    #: whether an attempt holds one of the run's concurrency slots (`max_concurrency`);
    #: a node that runs other nodes does not: they hold their own
    takes_slot: ClassVar[bool] = True

    def inline(self, spec: S) -> Callable[..., Any] | None:
        """A synchronous `(**inputs) -> output` for a node quick enough to run in the task
        that readied it (None: it runs through `run`). Used only for nodes without a
        timeout or retries."""
        return None

    @abstractmethod
    async def run(self, call: NodeCall[S]) -> Any:
        """One attempt: the node's output (exceptions fail the attempt)."""
