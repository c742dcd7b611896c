"""The `map` kind: run an inner node once per element of a list (bound to `$item` inside
it), then collect the outputs in order, optionally folding them with `reduce`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from treadle.graphs.compiled import CompiledNode
from treadle.graphs.handles import NodeAdder, NodeHandle, binding
from treadle.graphs.kinds.base import (
    FUNC_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
    Prompted,
    kind_of,
)
from treadle.graphs.kinds.file_fields import FileFields, ImportPath, ValueOrRef
from treadle.graphs.spec import NodeOptions, NodeSpec
from treadle.graphs.typecheck import describe, element_type, type_hints

if TYPE_CHECKING:  # the file format's union of inner nodes, resolved by its module
    from typing import Any as InnerNode


@dataclass
class MapNode(NodeSpec):
    """Run `node` once per element of `over` (bound to `$item` inside it), then collect the
    outputs in order, optionally folding them with `reduce(list) -> value`."""

    over: Any = None
    node: NodeSpec | None = None
    reduce: Callable[..., Any] | None = None
    kind: ClassVar[str] = "map"


class MapMethods(NodeAdder):
    def map(
        self,
        id: str,
        over: Any,
        node: NodeSpec,
        *,
        reduce: Callable[..., Any] | None = None,
        **options: Any,
    ) -> NodeHandle:
        if not node.id:
            node.id = id
        spec = MapNode(
            id=id, options=NodeOptions.of(options), over=binding(over), node=node, reduce=reduce
        )
        return self.add(spec)


class MapFields(FileFields):
    kind: Literal["map"]
    over: ValueOrRef = Field(description="The list to fan out over, usually a reference.")
    # `InnerNode`: every kind's inner file model (treadle.graphs.files.schema resolves it)
    node: InnerNode = Field(description="The node run once per element ($item).")
    reduce: ImportPath | None = Field(None, description="Folds the list of outputs.")


class MapKind(NodeKind[MapNode]):
    spec = MapNode
    fields = MapFields
    file_doc = (
        "Run a node once per element of a list (a map reads only `over`; the inner node has "
        "the inputs)."
    )
    inner_file_doc = "A nested map (inside a map)."
    has_inputs = False
    mermaid = ('[/"', '"/]')
    dot = "shape=box3d"

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> MapNode:
        over = r.value(m.over, (*path, "over"))
        inner = r.nested_node(m.node, (*path, "node"), m.node.id or common["id"], common["source"])
        reduce_fn = r.function(m.reduce, (*path, "reduce")) if m.reduce else None
        return MapNode(**common, over=over, node=inner, reduce=reduce_fn)

    def describe(self, node: MapNode, c: Checks, item_type: Any) -> CompiledNode:
        if node.node is None:
            c.issue("a map needs an inner node", node, "node")
            return CompiledNode(node.id, node, {}, list[Any])
        inner = c.describe(node.node, item_type)
        collected: Any = list[inner.output_type]  # type: ignore[name-defined]
        if node.reduce is not None:
            collected = type_hints(node.reduce).get("return", Any)
        return CompiledNode(node.id, node, {}, collected, inner=inner, child=inner.child)

    def check(
        self,
        node: MapNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        src = c.binding_type(node.over, node, prefix + "over", item_type, deps)
        elem = element_type(src) if src is not None else Any
        if src is not None and elem is None:
            c.issue(f"map needs a list to iterate over, got {describe(src)}", node, "over")
        if cn.inner is not None and node.node is not None:
            deps += c.check_node(node.node, cn.inner, elem or Any, prefix="node.")
        if node.reduce is not None and not callable(node.reduce):
            c.issue("reduce must be callable", node, prefix + "reduce")

    def bindings(self, node: MapNode) -> Iterator[tuple[str, Any]]:
        yield from node.inputs.items()
        yield "over", node.over
        if node.node is not None:
            yield from kind_of(node.node).bindings(node.node)

    def cost_s(self, node: MapNode) -> float:
        return kind_of(node.node).cost_s(node.node) if node.node is not None else FUNC_COST_S

    def llm_steps(self, node: MapNode) -> int:
        return kind_of(node.node).llm_steps(node.node) if node.node is not None else 0

    def prompted(self, node: MapNode) -> Prompted | None:
        return kind_of(node.node).prompted(node.node) if node.node is not None else None

    def tools_called(self, node: MapNode) -> tuple[str, ...]:
        return kind_of(node.node).tools_called(node.node) if node.node is not None else ()

    def label(self, node: MapNode) -> str:
        if node.node is None:
            return super().label(node)
        inner = kind_of(node.node).label(node.node).split("\\n", 1)[1]
        return f"{node.id}\\nmap × {inner}"

    def imported(self, node: MapNode) -> Iterator[Imported]:
        if node.reduce is not None:
            yield Imported(f"nodes[{node.id}].reduce", node.reduce, "function")
        if node.node is not None:
            yield from kind_of(node.node).imported(node.node)


MAP = MapKind()
