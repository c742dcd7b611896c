"""The `tool` kind: a call to a tool with bound arguments."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from treadle.graphs.compiled import CompiledNode, Param
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    TOOL_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
)
from treadle.graphs.kinds.file_fields import FileFields, ToolRef
from treadle.graphs.spec import NodeOptions, NodeSpec
from treadle.tools import Tool


@dataclass
class ToolNode(NodeSpec):
    """A call to a tool with bound arguments."""

    tool: Tool | None = None
    kind: ClassVar[str] = "tool"


class ToolSteps:
    @staticmethod
    def tool(
        tool: Tool, *, inputs: Mapping[str, Any] | None = None, id: str = "", **options: Any
    ) -> ToolNode:
        if not isinstance(tool, Tool):
            raise TypeError(f"expected a Tool (decorate the function with @tool), got {tool!r}")
        return ToolNode(id=id, inputs=bindings(inputs), options=NodeOptions.of(options), tool=tool)


class ToolMethods(NodeAdder):
    def tool(
        self, id: str, tool: Tool, *, inputs: Mapping[str, Any] | None = None, **options: Any
    ) -> NodeHandle:
        return self.add(ToolSteps.tool(tool, inputs=inputs, id=id, **options))


class ToolFields(FileFields):
    kind: Literal["tool"]
    tool: ToolRef


class ToolKind(NodeKind[ToolNode]):
    spec = ToolNode
    fields = ToolFields
    file_doc = "Call a tool with bound arguments."
    inner_file_doc = "Call a tool (inside a map)."
    dot = "shape=box"

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> ToolNode:
        return ToolNode(**common, tool=r.tool(m.tool, (*path, "tool")))

    def describe(self, node: ToolNode, c: Checks, item_type: Any) -> CompiledNode:
        if node.tool is None:
            c.issue("no tool given", node, "tool")
            return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
        params = {
            name: Param(f.annotation, f.is_required())
            for name, f in node.tool.input_model.model_fields.items()
        }
        return CompiledNode(node.id, node, params, node.tool.output_type)

    def cost_s(self, node: ToolNode) -> float:
        expected = node.tool.expected_duration_s if node.tool is not None else None
        return expected if expected is not None else TOOL_COST_S

    def llm_steps(self, node: ToolNode) -> int:
        return 0

    def tools_called(self, node: ToolNode) -> tuple[str, ...]:
        return (node.tool.name,) if node.tool is not None else ()

    def label(self, node: ToolNode) -> str:
        detail = f": {node.tool.name}" if node.tool is not None else ""
        return f"{node.id}\\ntool{detail}"

    def imported(self, node: ToolNode) -> Iterator[Imported]:
        if node.tool is not None:
            yield Imported(f"nodes[{node.id}].tool", node.tool, "tool")


TOOL = ToolKind()
