"""The `branch` kind: choose a route; the nodes listed under the chosen label run, those
listed only under other labels are skipped. The output is the chosen label."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import Field, field_validator

from treadle.graphs.compiled import CompiledNode, Param
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    FUNC_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
)
from treadle.graphs.kinds.file_fields import FileFields, ImportPath, NodeId
from treadle.graphs.spec import NodeOptions, NodeSpec
from treadle.graphs.typecheck import type_hints


@dataclass
class BranchNode(NodeSpec):
    """Choose a route. `route(**inputs)` returns a label (without `route`, the single
    input's value is the label); the nodes listed under that label in `routes` run, those
    listed only under other labels are skipped. The output is the chosen label."""

    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    route: Callable[..., Any] | None = None
    default: str | None = None
    kind: ClassVar[str] = "branch"


def route_label(value: Any) -> str:
    """The label a branch value selects: bools are "true"/"false", enums their value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def label_text(value: Any) -> Any:
    """A route label written in a file as a string, as `route_label` makes it: YAML `true`
    -> "true", `1` -> "1" (anything but a bool or number is left for validation to judge)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


class BranchMethods(NodeAdder):
    def branch(
        self,
        id: str,
        routes: Mapping[Any, Iterable[str | NodeHandle]],
        *,
        inputs: Mapping[str, Any] | None = None,
        route: Callable[..., Any] | None = None,
        default: Any = None,
        **options: Any,
    ) -> NodeHandle:
        table = {
            route_label(label): tuple(t.id if isinstance(t, NodeHandle) else t for t in targets)
            for label, targets in routes.items()
        }
        return self.add(
            BranchNode(
                id=id,
                inputs=bindings(inputs),
                options=NodeOptions.of(options),
                routes=table,
                route=route,
                default=None if default is None else route_label(default),
            )
        )


class BranchFields(FileFields):
    kind: Literal["branch"]
    routes: dict[str, list[NodeId]] = Field(
        min_length=1, description="Label -> the nodes that run when it is chosen."
    )
    route: ImportPath | None = Field(
        None, description="route(**inputs) -> label; without it the single input is the label."
    )
    default: str | None = Field(None, description="The label used when none matches.")

    @field_validator("routes", mode="before")
    @classmethod
    def _label_keys(cls, value: Any) -> Any:
        # YAML reads `true:` and `1:` as bool/int keys; labels are strings.
        if isinstance(value, dict):
            return {label_text(k): v for k, v in value.items()}
        return value

    @field_validator("default", mode="before")
    @classmethod
    def _label_default(cls, value: Any) -> Any:
        return label_text(value) if value is not None else value


class BranchKind(NodeKind[BranchNode]):
    spec = BranchNode
    fields = BranchFields
    file_doc = "Choose which nodes run."
    inner_file_doc = "A branch (inside a map)."
    mermaid = ('{"', '"}')
    dot = "shape=diamond"

    def from_file(
        self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath
    ) -> BranchNode:
        routes = {label: tuple(ids) for label, ids in m.routes.items()}
        route_fn = r.function(m.route, (*path, "route")) if m.route else None
        return BranchNode(**common, routes=routes, route=route_fn, default=m.default)

    def describe(self, node: BranchNode, c: Checks, item_type: Any) -> CompiledNode:
        if node.route is not None:
            params, _, extra = c.signature(node, node.route, "route")
            return CompiledNode(node.id, node, params, str, accepts_extra=extra)
        params = {name: Param(Any, True) for name in node.inputs}
        return CompiledNode(node.id, node, params, str)

    def check(
        self,
        node: BranchNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        if node.route is None and len(node.inputs) != 1:
            c.issue("a branch without `route` takes exactly one input", node, "inputs")

    def check_graph(self, node: BranchNode, c: Checks, by_id: Mapping[str, NodeSpec]) -> None:
        if not node.routes:
            c.issue("a branch needs at least one route", node, "routes")
        possible = self._possible_labels(node, c)
        for label, targets in node.routes.items():
            if possible is not None and label not in possible:
                options = ", ".join(sorted(possible))
                c.issue(
                    f"route {label!r} can never be taken (possible: {options})",
                    node,
                    f"routes.{label}",
                )
            for target in targets:
                if target not in by_id:
                    c.issue(f"route target {target!r} is not a node", node, f"routes.{label}")
                elif target == node.id:
                    c.issue("a branch cannot route to itself", node, f"routes.{label}")
        if node.default is not None and node.default not in node.routes:
            c.issue(f"default route {node.default!r} is not a route", node, "default")

    def _possible_labels(self, node: BranchNode, c: Checks) -> set[str] | None:
        if node.route is not None:
            return _labels_of(type_hints(node.route).get("return", Any))
        if len(node.inputs) == 1:
            (only,) = node.inputs.values()
            return _labels_of(c.static_type(only))
        return None

    def control_edges(self, node: BranchNode) -> Iterable[tuple[str, str]]:
        for label, targets in node.routes.items():
            for target in targets:
                yield label, target

    def cost_s(self, node: BranchNode) -> float:
        return FUNC_COST_S

    def llm_steps(self, node: BranchNode) -> int:
        return 0

    def imported(self, node: BranchNode) -> Iterator[Imported]:
        if node.route is not None:
            yield Imported(f"nodes[{node.id}].route", node.route, "function")


def _labels_of(tp: Any) -> set[str] | None:
    if tp is bool:
        return {"true", "false"}
    if get_origin(tp) is Literal:
        return {route_label(v) for v in get_args(tp)}
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        return {str(m.value) for m in tp}
    return None


BRANCH = BranchKind()
