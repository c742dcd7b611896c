"""The `race` kind: run two or more branches at once; the first to finish wins and the
others are cancelled (their cleanup runs, their LLM calls are aborted, what the scheduler
holds for them is released). The output says which branch won: `{winner, output}`.

A branch is a node (`step.llm(...)`, `step.subgraph(...)`, ...), named by its id; a branch
that fails or is skipped drops out, and the race fails only when every branch has.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field, create_model

from treadle.graphs.compiled import CompiledNode
from treadle.graphs.handles import NodeAdder, NodeHandle
from treadle.graphs.kinds.base import (
    FUNC_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
    kind_of,
    node_imports,
)
from treadle.graphs.kinds.file_fields import FileFields
from treadle.graphs.spec import NodeOptions, NodeSpec

if TYPE_CHECKING:  # the file format's union of inner nodes, resolved by its module
    from typing import Any as InnerNode


@dataclass
class RaceNode(NodeSpec):
    """Run `branches` at once; the first to finish wins, the others are cancelled. The
    output is `{winner: <branch id>, output: <its output>}`."""

    branches: tuple[NodeSpec, ...] = field(default_factory=tuple)
    kind: ClassVar[str] = "race"


class RaceMethods(NodeAdder):
    def race(
        self,
        id: str,
        branches: Mapping[str, NodeSpec] | Sequence[NodeSpec],
        **options: Any,
    ) -> NodeHandle:
        """`branches`: {name: node}, or nodes with ids (`step.llm(..., id="fast")`)."""
        if isinstance(branches, Mapping):
            for name, node in branches.items():
                node.id = name
            nodes = tuple(branches.values())
        else:
            nodes = tuple(branches)
        return self.add(RaceNode(id=id, options=NodeOptions.of(options), branches=nodes))


class RaceFields(FileFields):
    kind: Literal["race"]
    # `InnerNode`: every kind's inner file model (treadle.graphs.files.schema resolves it)
    branches: list[InnerNode] = Field(
        min_length=2, description="The nodes that race, each named by its id."
    )


class RaceKind(NodeKind[RaceNode]):
    spec = RaceNode
    fields = RaceFields
    file_doc = "Run branches at once; the first to finish wins, the others are cancelled."
    inner_file_doc = "A race (inside a map)."
    has_inputs = False
    mermaid = ('{{"', '"}}')
    dot = "shape=hexagon"

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> RaceNode:
        branches = tuple(
            r.nested_node(b, (*path, "branches", i), b.id or f"branch{i}", common["source"])
            for i, b in enumerate(m.branches)
        )
        return RaceNode(**common, branches=branches)

    def describe(self, node: RaceNode, c: Checks, item_type: Any) -> CompiledNode:
        # branches are not elements of a map: `$item` is not theirs to read
        nested = {b.id: c.describe(b, None) for b in node.branches}
        return CompiledNode(node.id, node, {}, race_output(node.id, nested), nested=nested)

    def check(
        self,
        node: RaceNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        if len(node.branches) < 2:
            c.issue("a race needs at least two branches", node, prefix + "branches")
        seen: set[str] = set()
        for branch in node.branches:
            if not branch.id:
                c.issue("every branch needs an id (its name)", node, prefix + "branches")
            elif branch.id in seen:
                c.issue(f"two branches are named {branch.id!r}", node, prefix + "branches")
            seen.add(branch.id)
            inner = cn.nested.get(branch.id)
            if inner is not None:
                deps += c.check_node(branch, inner, None, prefix=f"branches.{branch.id}.")

    def bindings(self, node: RaceNode) -> Iterator[tuple[str, Any]]:
        for branch in node.branches:
            yield from kind_of(branch).bindings(branch)

    def cost_s(self, node: RaceNode) -> float:
        # the first to finish ends it
        return min((kind_of(b).cost_s(b) for b in node.branches), default=FUNC_COST_S)

    def llm_steps(self, node: RaceNode) -> int:
        return max((kind_of(b).llm_steps(b) for b in node.branches), default=0)

    def tools_called(self, node: RaceNode) -> tuple[str, ...]:
        return tuple(t for b in node.branches for t in kind_of(b).tools_called(b))

    def label(self, node: RaceNode) -> str:
        return f"{node.id}\\nrace: {' | '.join(b.id for b in node.branches)}"

    def imported(self, node: RaceNode) -> Iterator[Imported]:
        for branch in node.branches:
            yield from node_imports(branch)


def race_output(node_id: str, branches: Mapping[str, CompiledNode]) -> type[BaseModel]:
    """The output type of a race: which branch won (a `Literal` of their ids), and its
    output (the branches' output types, or their union)."""
    types_: list[Any] = []
    for branch in branches.values():
        if all(repr(branch.output_type) != repr(t) for t in types_):
            types_.append(branch.output_type)
    output: Any = Any if not types_ else types_[0] if len(types_) == 1 else Union[tuple(types_)]  # noqa: UP007
    winner: Any = Literal[tuple(branches)] if branches else str
    name = "".join(ch if ch.isalnum() else "_" for ch in node_id)
    return create_model(f"{name}_race", winner=(winner, ...), output=(output, ...))


RACE = RaceKind()
