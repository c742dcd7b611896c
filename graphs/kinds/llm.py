"""The `llm` kind: a chat call whose prompt is a template over the inputs, optionally with
tools the model may call (a tool-calling conversation)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from treadle.graphs.compiled import CompiledNode, Param
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    LLM_STEP_COST_S,
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
from treadle.graphs.typecheck import _is_model, describe
from treadle.tools import Tool


@dataclass
class LLMNode(NodeSpec):
    """A chat call. `prompt` (and `system`) are templates over the inputs (`{name}`).

    `output` is `str` or a pydantic model the answer must parse into. With `tools` the
    node runs a tool-calling conversation (parallel calls run at once) until the model
    answers without calling a tool or `max_turns` is reached.
    """

    prompt: str = ""
    model: str = "default"
    system: str | None = None
    output: Any = str
    tools: tuple[Tool, ...] = ()
    max_turns: int = 8
    temperature: float | None = None
    max_tokens: int | None = None
    kind: ClassVar[str] = "llm"


class LLMSteps:
    @staticmethod
    def llm(
        prompt: str,
        *,
        inputs: Mapping[str, Any] | None = None,
        model: str = "default",
        system: str | None = None,
        output: Any = str,
        tools: Iterable[Tool] = (),
        max_turns: int = 8,
        temperature: float | None = None,
        max_tokens: int | None = None,
        id: str = "",
        **options: Any,
    ) -> LLMNode:
        return LLMNode(
            id=id,
            inputs=bindings(inputs),
            options=NodeOptions.of(options),
            prompt=prompt,
            model=model,
            system=system,
            output=output,
            tools=tuple(tools),
            max_turns=max_turns,
            temperature=temperature,
            max_tokens=max_tokens,
        )


class LLMMethods(NodeAdder):
    def llm(
        self,
        id: str,
        prompt: str,
        *,
        inputs: Mapping[str, Any] | None = None,
        model: str = "default",
        system: str | None = None,
        output: Any = str,
        tools: Iterable[Tool] = (),
        max_turns: int = 8,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **options: Any,
    ) -> NodeHandle:
        return self.add(
            LLMSteps.llm(
                prompt,
                inputs=inputs,
                model=model,
                system=system,
                output=output,
                tools=tools,
                max_turns=max_turns,
                temperature=temperature,
                max_tokens=max_tokens,
                id=id,
                **options,
            )
        )


class LLMFields(FileFields):
    kind: Literal["llm"]
    prompt: str = Field(description="Template over the inputs: 'Answer {question}'.")
    system: str | None = Field(None, description="System prompt (a template too).")
    model: str = Field("default", min_length=1, description="A model alias.")
    output: TypeString = Field("str", description="str, or the type the answer must parse to.")
    tools: list[ToolRef] = Field(default_factory=list, description="Tools the model may call.")
    max_turns: int = Field(8, ge=1, description="Tool-calling rounds before giving up.")
    temperature: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)


class LLMKind(NodeKind[LLMNode]):
    spec = LLMNode
    fields = LLMFields
    file_doc = "A chat call (optionally with tools)."
    inner_file_doc = "A chat call (inside a map)."
    mermaid = ('("', '")')
    dot = "shape=ellipse"

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> LLMNode:
        return LLMNode(
            **common,
            prompt=m.prompt,
            model=m.model,
            system=m.system,
            output=r.resolve_type(m.output, (*path, "output")),
            tools=tuple(r.tool(t, (*path, "tools", i)) for i, t in enumerate(m.tools)),
            max_turns=m.max_turns,
            temperature=m.temperature,
            max_tokens=m.max_tokens,
        )

    def describe(self, node: LLMNode, c: Checks, item_type: Any) -> CompiledNode:
        return CompiledNode(node.id, node, prompt_params(node, node, c), node.output)

    def check(
        self,
        node: LLMNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        check_model(node, node, c, prefix)
        if not (node.output is str or _is_model(node.output) or node.output is Any):
            c.issue(
                "output must be str or a pydantic model, got " + describe(node.output),
                node,
                prefix + "output",
            )
        if node.max_turns < 1:
            c.issue("max_turns must be >= 1", node, prefix + "max_turns")

    def unused_input(self, node: LLMNode, name: str, params: Mapping[str, Param]) -> str:
        return unused_by_prompt(name)

    def cost_s(self, node: LLMNode) -> float:
        return LLM_STEP_COST_S

    def llm_steps(self, node: LLMNode) -> int:
        return 1

    def prompted(self, node: LLMNode) -> Prompted:
        return node

    def label(self, node: LLMNode) -> str:
        return f"{node.id}\\nllm: {node.model}"

    def imported(self, node: LLMNode) -> Iterator[Imported]:
        for tool in node.tools:
            yield Imported(f"nodes[{node.id}].tools", tool, "tool")
        yield Imported(f"nodes[{node.id}].output", node.output, "type")


LLM = LLMKind()
