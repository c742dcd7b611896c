"""The `ask` kind: human input. The run asks a person (`prompt`, a template over the
inputs) for a value of type `output` and waits for the answer: durably, holding nothing
while it waits (status `waiting`). With `deadline_s`, the request expires that many
seconds after it was first asked; `default`, when given, is then the answer (without one,
the node fails: its error policy decides).

The runtime side is `treadle.runtime.nodes.ask` and `treadle.runtime.core.waiting`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationError

from treadle.graphs.compiled import CompiledNode, Param
from treadle.graphs.handles import NodeAdder, NodeHandle, bindings
from treadle.graphs.kinds.base import (
    Checks,
    DocPath,
    FileResolver,
    Imported,
    NodeKind,
    template_fields,
)
from treadle.graphs.kinds.file_fields import FileFields, TypeString
from treadle.graphs.spec import NodeOptions, NodeSpec
from treadle.graphs.typecheck import describe


class _NoDefault:
    """`AskNode.default` when the request has none."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclass
class AskNode(NodeSpec):
    """Ask a person for a value of type `output` (a pydantic model, or str, bool, ...);
    `prompt` is a template over the inputs (`{command}`). The run waits, durably, until
    the answer is given (`Runtime.resume`, `treadle resume`, the daemon's
    `POST /v1/runs/{id}/input`) or `deadline_s` has passed since it was asked, when
    `default` (if given) is the answer."""

    prompt: str = ""
    output: Any = str
    deadline_s: float | None = None
    default: Any = NO_DEFAULT
    kind: ClassVar[str] = "ask"

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT


class AskSteps:
    @staticmethod
    def ask(
        prompt: str,
        *,
        inputs: Mapping[str, Any] | None = None,
        output: Any = str,
        deadline_s: float | None = None,
        default: Any = NO_DEFAULT,
        id: str = "",
        **options: Any,
    ) -> AskNode:
        return AskNode(
            id=id,
            inputs=bindings(inputs),
            options=NodeOptions.of(options),
            prompt=prompt,
            output=output,
            deadline_s=deadline_s,
            default=default,
        )


class AskMethods(NodeAdder):
    def ask(
        self,
        id: str,
        prompt: str,
        *,
        inputs: Mapping[str, Any] | None = None,
        output: Any = str,
        deadline_s: float | None = None,
        default: Any = NO_DEFAULT,
        **options: Any,
    ) -> NodeHandle:
        return self.add(
            AskSteps.ask(
                prompt,
                inputs=inputs,
                output=output,
                deadline_s=deadline_s,
                default=default,
                id=id,
                **options,
            )
        )


class AskFields(FileFields):
    kind: Literal["ask"]
    prompt: str = Field(description="What to ask, a template over the inputs: 'Run {cmd}?'.")
    output: TypeString = Field("str", description="The type of the answer (its schema).")
    deadline_s: float | None = Field(
        None, gt=0, description="Seconds after the first asking when `default` answers."
    )
    default: Any = Field(None, description="The answer once the deadline has passed.")


class AskKind(NodeKind[AskNode]):
    spec = AskNode
    fields = AskFields
    file_doc = "Ask a person for a typed value; the run waits for the answer (human input)."
    inner_file_doc = "Ask a person (inside a map)."
    mermaid = ('[/"', '"\\]')
    dot = "shape=house"

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> AskNode:
        return AskNode(
            **common,
            prompt=m.prompt,
            output=r.resolve_type(m.output, (*path, "output")),
            deadline_s=m.deadline_s,
            default=m.default if "default" in m.model_fields_set else NO_DEFAULT,
        )

    def describe(self, node: AskNode, c: Checks, item_type: Any) -> CompiledNode:
        names = template_fields(node.prompt, node, c, "prompt")
        return CompiledNode(
            node.id, node, {name: Param(Any, True) for name in sorted(names)}, node.output
        )

    def check(
        self,
        node: AskNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(node.output)
            adapter.json_schema()
        except Exception:
            c.issue(
                f"output {describe(node.output)} has no JSON Schema to ask with",
                node,
                prefix + "output",
            )
            return
        if node.deadline_s is not None and not node.deadline_s > 0:
            c.issue("deadline_s must be > 0", node, prefix + "deadline_s")
        if node.has_default:
            try:
                adapter.validate_python(node.default)
            except ValidationError as exc:
                problem = exc.errors()[0]["msg"]
                c.issue(
                    f"default does not fit {describe(node.output)}: {problem}",
                    node,
                    prefix + "default",
                )

    def unused_input(self, node: AskNode, name: str, params: Mapping[str, Param]) -> str:
        return f"input {name!r} is not used by the prompt"

    def cost_s(self, node: AskNode) -> float:
        # a person's time is not the machine's: it does not weigh on the critical path
        return 0.0

    def llm_steps(self, node: AskNode) -> int:
        return 0

    def label(self, node: AskNode) -> str:
        return f"{node.id}\\nask"

    def imported(self, node: AskNode) -> Iterator[Imported]:
        yield Imported(f"nodes[{node.id}].output", node.output, "type")


ASK = AskKind()
