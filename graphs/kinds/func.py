"""The `func` kind: a Python function; its parameters are the inputs, its return value the
output."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from treadle.graphs.compiled import CompiledNode
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    FUNC_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
)
from treadle.graphs.kinds.file_fields import FileFields, ImportPath
from treadle.graphs.spec import NodeOptions, NodeSpec


@dataclass
class FuncNode(NodeSpec):
    """A Python function; its parameters are the inputs, its return value the output.

    Sync functions run on the event loop (they should be quick); set `blocking=True` to run
    one in a worker thread instead.
    """

    fn: Callable[..., Any] = field(default=lambda: None)
    blocking: bool = False
    kind: ClassVar[str] = "func"


class FuncSteps:
    @staticmethod
    def func(
        fn: Callable[..., Any],
        *,
        inputs: Mapping[str, Any] | None = None,
        blocking: bool = False,
        id: str = "",
        **options: Any,
    ) -> FuncNode:
        return FuncNode(
            id=id,
            inputs=bindings(inputs),
            options=NodeOptions.of(options),
            fn=fn,
            blocking=blocking,
        )


class FuncMethods(NodeAdder):
    def func(
        self,
        id: str,
        fn: Callable[..., Any],
        *,
        inputs: Mapping[str, Any] | None = None,
        blocking: bool = False,
        **options: Any,
    ) -> NodeHandle:
        return self.add(FuncSteps.func(fn, inputs=inputs, blocking=blocking, id=id, **options))


class FuncFields(FileFields):
    kind: Literal["func"]
    fn: ImportPath = Field(description="The function, as 'package.module:function'.")
    blocking: bool = Field(False, description="Run a sync function in a worker thread.")


class FuncKind(NodeKind[FuncNode]):
    spec = FuncNode
    fields = FuncFields
    file_doc = "Call a Python function."
    inner_file_doc = "Call a Python function (inside a map)."
    dot = 'shape=box, style="rounded"'

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> FuncNode:
        return FuncNode(**common, fn=r.function(m.fn, (*path, "fn")), blocking=m.blocking)

    def describe(self, node: FuncNode, c: Checks, item_type: Any) -> CompiledNode:
        params, out, extra = c.signature(node, node.fn, "fn")
        return CompiledNode(node.id, node, params, out, accepts_extra=extra)

    def cost_s(self, node: FuncNode) -> float:
        return FUNC_COST_S

    def llm_steps(self, node: FuncNode) -> int:
        return 0

    def imported(self, node: FuncNode) -> Iterator[Imported]:
        yield Imported(f"nodes[{node.id}].fn", node.fn, "function")


FUNC = FuncKind()
