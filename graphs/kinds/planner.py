"""The `planner` kind: an LLM that writes a plan of tool calls (LLMCompiler's format), run
as the plan streams in, then a joiner that answers or asks for a new plan."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from treadle.graphs.compiled import CompiledNode, Param
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    LLM_STEP_COST_S,
    TOOL_COST_S,
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
    Prompted,
    check_model,
    prompt_params,
    unused_by_prompt,
)
from treadle.graphs.kinds.file_fields import FileFields, ToolRef, TypeString
from treadle.graphs.spec import NodeOptions, NodeSpec
from treadle.tools import Tool


@dataclass
class PlannerNode(NodeSpec):
    """An LLM that writes a plan of tool calls, one task a line, in LLMCompiler's format
    (`1. search("x")`, `2. calculator("$1 * 2")`, `3. join()`). Each task is dispatched as
    soon as its line has arrived and its dependencies are done. A joiner then answers
    (parsed as `output`) or asks for a new plan, at most `max_replans` times.
    """

    prompt: str = ""
    model: str = "default"
    system: str | None = None
    tools: tuple[Tool, ...] = ()
    output: Any = str
    max_replans: int = 2
    #: the joiner's instructions (a default is used when None)
    joiner: str | None = None
    kind: ClassVar[str] = "planner"


class PlannerSteps:
    @staticmethod
    def planner(
        prompt: str,
        *,
        tools: Iterable[Tool],
        inputs: Mapping[str, Any] | None = None,
        model: str = "default",
        system: str | None = None,
        output: Any = str,
        max_replans: int = 2,
        joiner: str | None = None,
        id: str = "",
        **options: Any,
    ) -> PlannerNode:
        return PlannerNode(
            id=id,
            inputs=bindings(inputs),
            options=NodeOptions.of(options),
            prompt=prompt,
            model=model,
            system=system,
            tools=tuple(tools),
            output=output,
            max_replans=max_replans,
            joiner=joiner,
        )


class PlannerMethods(NodeAdder):
    def planner(
        self,
        id: str,
        prompt: str,
        *,
        tools: Iterable[Tool],
        inputs: Mapping[str, Any] | None = None,
        model: str = "default",
        system: str | None = None,
        output: Any = str,
        max_replans: int = 2,
        joiner: str | None = None,
        **options: Any,
    ) -> NodeHandle:
        return self.add(
            PlannerSteps.planner(
                prompt,
                tools=tools,
                inputs=inputs,
                model=model,
                system=system,
                output=output,
                max_replans=max_replans,
                joiner=joiner,
                id=id,
                **options,
            )
        )


class PlannerFields(FileFields):
    kind: Literal["planner"]
    prompt: str = Field(description="Template over the inputs: what the plan must achieve.")
    system: str | None = Field(None, description="System prompt (a template too).")
    model: str = Field("default", min_length=1, description="A model alias.")
    tools: list[ToolRef] = Field(min_length=1, description="Tools the plan may call.")
    output: TypeString = Field("str", description="str, or the type the answer must parse to.")
    max_replans: int = Field(2, ge=0, description="New plans the joiner may ask for.")
    joiner: str | None = Field(None, description="The joiner's instructions.")


class PlannerKind(NodeKind[PlannerNode]):
    spec = PlannerNode
    fields = PlannerFields
    file_doc = "An LLM that plans tool calls, run as they stream in, then joins the results."
    inner_file_doc = "A planner (inside a map)."

    def from_file(
        self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath
    ) -> PlannerNode:
        return PlannerNode(
            **common,
            prompt=m.prompt,
            model=m.model,
            system=m.system,
            tools=tuple(r.tool(t, (*path, "tools", i)) for i, t in enumerate(m.tools)),
            output=r.resolve_type(m.output, (*path, "output")),
            max_replans=m.max_replans,
            joiner=m.joiner,
        )

    def describe(self, node: PlannerNode, c: Checks, item_type: Any) -> CompiledNode:
        return CompiledNode(node.id, node, prompt_params(node, node, c), node.output)

    def check(
        self,
        node: PlannerNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        check_model(node, node, c, prefix)
        if not node.tools:
            c.issue("a planner needs at least one tool", node, prefix + "tools")
        if node.max_replans < 0:
            c.issue("max_replans must be >= 0", node, prefix + "max_replans")

    def unused_input(self, node: PlannerNode, name: str, params: Mapping[str, Param]) -> str:
        return unused_by_prompt(name)

    def cost_s(self, node: PlannerNode) -> float:
        return 2 * LLM_STEP_COST_S + TOOL_COST_S  # plan, its tasks, join

    def llm_steps(self, node: PlannerNode) -> int:
        return 2

    def prompted(self, node: PlannerNode) -> Prompted:
        return node

    def imported(self, node: PlannerNode) -> Iterator[Imported]:
        for tool in node.tools:
            yield Imported(f"nodes[{node.id}].tools", tool, "tool")
        yield Imported(f"nodes[{node.id}].output", node.output, "type")


PLANNER = PlannerKind()
