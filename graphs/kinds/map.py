"""The `map` kind: run an inner node once per element of a list (bound to `$item` inside
it, its index to `$index`), then collect the outputs in order, optionally folding them
with `reduce`. With `max_failures`, up to that many elements may fail without failing the
map, and the output lists every element as an `ElementResult` (its value or its error)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

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
    node_imports,
)
from treadle.graphs.kinds.file_fields import FileFields, ImportPath, ValueOrRef
from treadle.graphs.spec import ErrorInfo, NodeOptions, NodeSpec
from treadle.graphs.typecheck import describe, element_type, type_hints

if TYPE_CHECKING:  # the file format's union of inner nodes, resolved by its module
    from typing import Any as InnerNode


T = TypeVar("T")


class ElementResult(BaseModel, Generic[T]):
    """One element of a map with `max_failures`: its output, or why it failed."""

    index: int
    value: T | None = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class MapNode(NodeSpec):
    """Run `node` once per element of `over` (bound to `$item` inside it, its index to
    `$index`), then collect the outputs in order, optionally folding them with
    `reduce(list) -> value`.

    With `max_failures`, an element that fails (under its node's `fail` policy) does not
    fail the map until more than `max_failures` have; the output is then a list of
    `ElementResult`s, one per element that ran, each with its value or its error."""

    over: Any = None
    node: NodeSpec | None = None
    reduce: Callable[..., Any] | None = None
    max_failures: int | None = None
    kind: ClassVar[str] = "map"


class MapMethods(NodeAdder):
    def map(
        self,
        id: str,
        over: Any,
        node: NodeSpec,
        *,
        reduce: Callable[..., Any] | None = None,
        max_failures: int | None = None,
        **options: Any,
    ) -> NodeHandle:
        if not node.id:
            node.id = id
        spec = MapNode(
            id=id,
            options=NodeOptions.of(options),
            over=binding(over),
            node=node,
            reduce=reduce,
            max_failures=max_failures,
        )
        return self.add(spec)


class MapFields(FileFields):
    kind: Literal["map"]
    over: ValueOrRef = Field(description="The list to fan out over, usually a reference.")
    # `InnerNode`: every kind's inner file model (treadle.graphs.files.schema resolves it)
    node: InnerNode = Field(description="The node run once per element ($item, $index).")
    reduce: ImportPath | None = Field(None, description="Folds the list of outputs.")
    max_failures: int | None = Field(
        None,
        ge=0,
        description="Elements that may fail without failing the map; the output is then a "
        "list of {index, value, error}.",
    )


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
        return MapNode(
            **common, over=over, node=inner, reduce=reduce_fn, max_failures=m.max_failures
        )

    def describe(self, node: MapNode, c: Checks, item_type: Any) -> CompiledNode:
        if node.node is None:
            c.issue("a map needs an inner node", node, "node")
            return CompiledNode(node.id, node, {}, list[Any])
        inner = c.describe(node.node, item_type)
        collected: Any = list[inner.output_type]  # type: ignore[name-defined]
        if node.max_failures is not None:
            collected = list[ElementResult[inner.output_type]]  # type: ignore[name-defined]
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
        if node.max_failures is not None and (
            not isinstance(node.max_failures, int) or node.max_failures < 0
        ):
            c.issue("max_failures must be an int >= 0", node, prefix + "max_failures")

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
            yield from node_imports(node.node)


MAP = MapKind()
