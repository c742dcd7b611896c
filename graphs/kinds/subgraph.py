"""The `subgraph` kind: another graph used as one node; its inputs are the subgraph's
inputs, its output the subgraph's output."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from treadle.graphs.compiled import CompiledNode, Param
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    FUNC_COST_S,
    LLM_STEP_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
    graph_imports,
    kind_of,
)
from treadle.graphs.kinds.file_fields import FileFields
from treadle.graphs.spec import GraphSpec, NodeOptions, NodeSpec

if TYPE_CHECKING:  # the file format's workflow reference, resolved by its module
    from typing import Any as GraphRef


class HasGraphSpec(Protocol):
    """A graph under construction (the SDK's `Graph`)."""

    @property
    def spec(self) -> GraphSpec: ...


@dataclass
class SubgraphNode(NodeSpec):
    """Another graph used as one node; its inputs are the subgraph's inputs."""

    graph: GraphSpec | None = None
    kind: ClassVar[str] = "subgraph"


class SubgraphSteps:
    @staticmethod
    def subgraph(
        graph: HasGraphSpec | GraphSpec,
        *,
        inputs: Mapping[str, Any] | None = None,
        id: str = "",
        **options: Any,
    ) -> SubgraphNode:
        spec = graph if isinstance(graph, GraphSpec) else graph.spec
        return SubgraphNode(
            id=id, inputs=bindings(inputs), options=NodeOptions.of(options), graph=spec
        )


class SubgraphMethods(NodeAdder):
    def subgraph(
        self,
        id: str,
        graph: HasGraphSpec | GraphSpec,
        *,
        inputs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> NodeHandle:
        return self.add(SubgraphSteps.subgraph(graph, inputs=inputs, id=id, **options))


class SubgraphFields(FileFields):
    kind: Literal["subgraph"]
    # `GraphRef`: a file path or an inline workflow (treadle.graphs.files.schema resolves it)
    graph: GraphRef


class SubgraphKind(NodeKind[SubgraphNode]):
    spec = SubgraphNode
    fields = SubgraphFields
    file_doc = "Another workflow used as one node."
    inner_file_doc = "A subgraph (inside a map)."
    mermaid = ('[["', '"]]')

    def from_file(
        self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath
    ) -> SubgraphNode:
        return SubgraphNode(**common, graph=r.subgraph(m.graph, (*path, "graph"), common["id"]))

    def describe(self, node: SubgraphNode, c: Checks, item_type: Any) -> CompiledNode:
        if node.graph is None:
            c.issue("no graph given", node, "graph")
            return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
        child = c.compile_child(node, node.graph)
        if child is None:
            return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
        params = {name: Param(decl.type, decl.required) for name, decl in node.graph.inputs.items()}
        return CompiledNode(node.id, node, params, child.output_type, child=child)

    def cost_s(self, node: SubgraphNode) -> float:
        return LLM_STEP_COST_S * self.llm_steps(node) + FUNC_COST_S

    def llm_steps(self, node: SubgraphNode) -> int:
        if node.graph is None:
            return 0
        return sum(kind_of(n).llm_steps(n) for n in node.graph.nodes)

    def imported(self, node: SubgraphNode) -> Iterator[Imported]:
        if node.graph is not None:
            yield from graph_imports(node.graph)


SUBGRAPH = SubgraphKind()
