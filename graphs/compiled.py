"""What validation produces: `CompiledGraph` and its `CompiledNode`s, with the static facts
(`GraphFacts`) that the scheduler and pinning policy use.

These are plain data, below the node kinds (`treadle.graphs.kinds`), which describe their
nodes in these terms, and below the passes that build them (`treadle.graphs.compile`,
`treadle.graphs.analysis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    #: a subgraph node's (or a map-over-subgraph's, or a loop's body) compiled child
    child: CompiledGraph | None = None
    accepts_extra: bool = False
    #: the output under on_error="fallback": the node's `fallback`, as its output type
    fallback: Any = None
    #: other nodes this node runs, by name (a race's branches)
    nested: dict[str, CompiledNode] = field(default_factory=dict)
    #: the node run on this node's error (`on_error: handler`), `$error` bound
    handler: CompiledNode | None = None

    def nested_nodes(self) -> list[CompiledNode]:
        """Every node this node runs itself (inner, branches, handler), not those of its
        child graph."""
        found = [n for n in (self.inner, self.handler) if n is not None]
        return found + list(self.nested.values())

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
    #: every node right after this one asks a person (`ask`): once it ends, the program
    #: waits for an answer, for as long as that takes (hold no KV for it)
    human_wait_next: bool = False


@dataclass
class GraphFacts:
    llm: dict[str, LLMFacts] = field(default_factory=dict)
    critical_path: tuple[str, ...] = ()
    critical_path_cost_s: float = 0.0
    #: estimated cost from the start of each node to the end of the program
    remaining_cost_s: dict[str, float] = field(default_factory=dict)
    prefix_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def repeat(self, more_steps: int) -> None:
        """Make these the facts of a loop's body: each LLM step has `more_steps` more
        after it (those of the iterations still expected), so none is the last unless no
        iteration is expected after it."""
        for nid, facts in self.llm.items():
            steps = facts.steps_to_execution + more_steps
            self.llm[nid] = replace(facts, steps_to_execution=steps, is_last_llm_step=steps == 0)

    def update(self, other: GraphFacts) -> None:
        """Take `other`'s values, in place: whoever holds this object (the scheduler) sees
        refined facts at once."""
        self.llm = other.llm
        self.critical_path = other.critical_path
        self.critical_path_cost_s = other.critical_path_cost_s
        self.remaining_cost_s = other.remaining_cost_s
        self.prefix_groups = other.prefix_groups


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
        for child in self.children():
            out |= child.all_models()
        return out

    def node_at(self, instance: str) -> CompiledNode | None:
        """The node an instance id of a run names (`approve`, `m[3]`, `sub/x`, `fix[2]/ok`,
        `race/fast`, `x/on_error`), or None if it names none of this graph's."""
        current: CompiledNode | None = None
        for segment in instance.split("/"):
            name, indexed = segment.partition("[")[0], "[" in segment
            if current is None:
                found = self.nodes.get(name)
            elif name in current.nested:
                found = current.nested[name]
            elif current.handler is not None and current.handler.id == name:
                found = current.handler
            else:
                found = current.child.nodes.get(name) if current.child is not None else None
            if found is None:
                return None
            if indexed and found.inner is not None:  # a map's element: its inner node
                found = found.inner
            current = found
        return current

    def children(self) -> list[CompiledGraph]:
        """The graphs its nodes run (subgraphs, loop bodies, those of nested nodes); found
        once (a runtime asks on every run)."""
        found: list[CompiledGraph] | None = self.__dict__.get("_children")
        if found is None:
            found = []
            todo = list(self.nodes.values())
            while todo:
                node = todo.pop()
                if node.child is not None and all(node.child is not c for c in found):
                    found.append(node.child)
                todo.extend(node.nested_nodes())
            self.__dict__["_children"] = found
        return found
