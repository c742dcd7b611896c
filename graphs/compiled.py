"""What validation produces: `CompiledGraph` and its `CompiledNode`s, with the static facts
(`GraphFacts`) that the scheduler and pinning policy use.

These are plain data, below the node kinds (`treadle.graphs.kinds`), which describe their
nodes in these terms, and below the passes that build them (`treadle.graphs.compile`,
`treadle.graphs.analysis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from treadle.graphs.spec import GraphSpec, NodeSpec


@dataclass(frozen=True)
class Param:
    """A node input as the node declares it: its type, and whether it must be bound."""

    type: Any
    required: bool


@dataclass
class CompiledNode:
    """A validated node with everything the orchestrator needs precomputed."""

    id: str
    spec: NodeSpec
    params: dict[str, Param]
    output_type: Any
    deps: tuple[str, ...] = ()
    dependents: tuple[str, ...] = ()
    #: (branch id, labels under which this node runs)
    guards: tuple[tuple[str, frozenset[str]], ...] = ()
    #: a map's inner node
    inner: CompiledNode | None = None
    #: a subgraph node's (or a map-over-subgraph's) compiled child
    child: CompiledGraph | None = None
    accepts_extra: bool = False

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass(frozen=True)
class LLMFacts:
    node: str
    #: LLM steps after this node on the longest path through it (0: last LLM step)
    steps_to_execution: int
    is_last_llm_step: bool
    #: tools the program calls right after this step (its own tools, or tool nodes next)
    next_tools: tuple[str, ...]
    #: nodes whose prompts start the same way (same model, system prompt, template head)
    prefix_group: str


@dataclass
class GraphFacts:
    llm: dict[str, LLMFacts] = field(default_factory=dict)
    critical_path: tuple[str, ...] = ()
    critical_path_cost_s: float = 0.0
    #: estimated cost from the start of each node to the end of the program
    remaining_cost_s: dict[str, float] = field(default_factory=dict)
    prefix_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class CompiledGraph:
    spec: GraphSpec
    nodes: dict[str, CompiledNode]
    #: node ids in a topological order
    order: tuple[str, ...]
    input_model: type[BaseModel]
    output_type: Any
    facts: GraphFacts
    models: frozenset[str] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return self.spec.name

    def all_models(self) -> set[str]:
        """Model aliases used here and in every nested subgraph."""
        out = set(self.models)
        for node in self.nodes.values():
            if node.child is not None:
                out |= node.child.all_models()
        return out
