"""The `loop` kind: run a body graph again and again, at most `max_iterations` times, until
a typed condition on an iteration's output says stop (`until`) or no longer says go on
(`while`). Each iteration is checkpointed on its own (instance `fix[2]`, its nodes
`fix[2]/test`), so a resumed run repeats no finished iteration.

The first iteration's inputs are the loop node's; each later one's are the same, with the
inputs named in `carry` replaced by fields of the previous iteration's output
(`carry={"code": "code"}`). The output is the last iteration's output, or with
`collect="all"` the list of every iteration's.

A condition is a field of the body's output (`"passed"`, `"report.ok"`: it must be a bool)
or a function of the output returning a bool. For the static facts (critical path, LLM
steps ahead, last LLM step) a loop counts as `expected_iterations` bodies (default:
`max_iterations`), refined from the runs' history (`treadle.graphs.analysis`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field

from treadle.graphs.compiled import CompiledGraph, CompiledNode, Param
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
from treadle.graphs.kinds.file_fields import NAMES_OBJECT, FileFields, Ident
from treadle.graphs.kinds.subgraph import HasGraphSpec
from treadle.graphs.spec import GraphSpec, NodeOptions, NodeSpec
from treadle.graphs.typecheck import _is_model, describe, field_type, is_compatible, type_hints

if TYPE_CHECKING:  # the file format's workflow reference, resolved by its module
    from typing import Any as GraphRef

#: a stop condition: a field path of the iteration's output, or a function of it
Condition = str | Callable[[Any], bool]


@dataclass
class LoopNode(NodeSpec):
    """Run `body` repeatedly (see the module docstring): at most `max_iterations` times,
    until `until(output)` holds or while `while_(output)` does."""

    body: GraphSpec | None = None
    max_iterations: int = 0
    until: Condition | None = None
    while_: Condition | None = None
    #: body input -> field of the previous iteration's output ("" is the whole output)
    carry: dict[str, str] = field(default_factory=dict)
    expected_iterations: float | None = None
    collect: Literal["last", "all"] = "last"
    kind: ClassVar[str] = "loop"

    @property
    def expected(self) -> float:
        """Iterations the static facts count on."""
        if self.expected_iterations is not None and self.expected_iterations > 0:
            return min(float(self.expected_iterations), float(max(self.max_iterations, 1)))
        return float(max(self.max_iterations, 1))


def condition_met(node: LoopNode, output: Any) -> bool:
    """Whether the loop stops after an iteration with this output."""
    test = node.until if node.until is not None else node.while_
    if isinstance(test, str):
        value = output
        for part in test.split(".") if test else ():
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        holds = bool(value)
    else:
        assert test is not None  # compile requires until or while
        model = _takes_model(test)
        if model is not None and not isinstance(output, model):
            # the body's output model, as the condition's own model of the same fields
            data = output.model_dump() if isinstance(output, BaseModel) else output
            output = model.model_validate(data)
        holds = bool(test(output))
    return holds if node.until is not None else not holds


def _takes_model(fn: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model a condition's parameter is annotated with (None: another type)."""
    try:
        first = next(iter(inspect.signature(fn).parameters), None)
    except (TypeError, ValueError):
        return None
    param = type_hints(fn).get(first, Any) if first is not None else Any
    return param if isinstance(param, type) and issubclass(param, BaseModel) else None


class LoopMethods(NodeAdder):
    def loop(
        self,
        id: str,
        body: HasGraphSpec | GraphSpec,
        *,
        max_iterations: int,
        inputs: Mapping[str, Any] | None = None,
        until: Condition | None = None,
        while_: Condition | None = None,
        carry: Mapping[str, str] | None = None,
        expected_iterations: float | None = None,
        collect: Literal["last", "all"] = "last",
        **options: Any,
    ) -> NodeHandle:
        return self.add(
            LoopNode(
                id=id,
                inputs=bindings(inputs),
                options=NodeOptions.of(options),
                body=body if isinstance(body, GraphSpec) else body.spec,
                max_iterations=max_iterations,
                until=until,
                while_=while_,
                carry=dict(carry or {}),
                expected_iterations=expected_iterations,
                collect=collect,
            )
        )


#: a condition in a file: a field path, or an import path (which names an object)
ConditionText = Annotated[
    str,
    Field(
        min_length=1,
        description="A bool field of the body's output ('passed', 'report.ok'), or a "
        "function of the output as 'package.module:function'.",
    ),
    NAMES_OBJECT,
]


class LoopFields(FileFields):
    kind: Literal["loop"]
    # `GraphRef`: a file path or an inline workflow (treadle.graphs.files.schema resolves it)
    body: GraphRef
    max_iterations: int = Field(ge=1, description="The most iterations it runs (required).")
    until: ConditionText | None = Field(None, description="Stop once this holds.")
    while_: ConditionText | None = Field(None, alias="while", description="Go on while this holds.")
    carry: dict[Ident, str] = Field(
        default_factory=dict,
        description="Body input -> field of the previous iteration's output ('' for all "
        "of it): what each iteration after the first gets.",
    )
    expected_iterations: float | None = Field(
        None, gt=0, description="Iterations expected, for the static facts (a hint)."
    )
    collect: Literal["last", "all"] = Field(
        "last", description="The output: the last iteration's, or a list of all."
    )


class LoopKind(NodeKind[LoopNode]):
    spec = LoopNode
    fields = LoopFields
    file_doc = "Run a workflow repeatedly until a condition holds (at most max_iterations)."
    inner_file_doc = "A loop (inside a map)."
    mermaid = ('[["', '"]]')
    dot = "shape=cds"

    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> LoopNode:
        return LoopNode(
            **common,
            body=r.subgraph(m.body, (*path, "body"), common["id"]),
            max_iterations=m.max_iterations,
            until=_condition(m.until, r, (*path, "until")),
            while_=_condition(m.while_, r, (*path, "while")),
            carry=dict(m.carry),
            expected_iterations=m.expected_iterations,
            collect=m.collect,
        )

    def describe(self, node: LoopNode, c: Checks, item_type: Any) -> CompiledNode:
        if node.body is None:
            c.issue("a loop needs a body", node, "body")
            return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
        child = c.compile_child(node, node.body)
        if child is None:
            return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
        # the body's LLM steps have those of the iterations still expected after them
        child.facts.repeat(self.more_steps(node, child))
        params = {name: Param(decl.type, decl.required) for name, decl in node.body.inputs.items()}
        out: Any = child.output_type
        if node.collect == "all":
            out = list[out]
        return CompiledNode(node.id, node, params, out, child=child)

    def more_steps(self, node: LoopNode, child: CompiledGraph) -> int:
        """LLM steps of the iterations expected after any one (the body's, times those)."""
        body_steps = sum(kind_of(n).llm_steps(n) for n in child.spec.nodes)
        return round(body_steps * (node.expected - 1))

    def check(
        self,
        node: LoopNode,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        if not isinstance(node.max_iterations, int) or node.max_iterations < 1:
            c.issue("max_iterations must be an int >= 1 (a loop is bounded)", node,
                    prefix + "max_iterations")  # fmt: skip
        if (node.until is None) == (node.while_ is None):
            c.issue("a loop takes one condition: until or while", node, prefix + "until")
        if node.collect not in ("last", "all"):
            c.issue("collect must be 'last' or 'all'", node, prefix + "collect")
        if cn.child is None or node.body is None:
            return
        out = cn.child.output_type
        for name, test in (("until", node.until), ("while", node.while_)):
            if test is not None:
                self._check_condition(node, test, out, c, prefix + name)
        for name, source in node.carry.items():
            where = f"{prefix}carry.{name}"
            decl = node.body.inputs.get(name)
            if decl is None:
                known = ", ".join(node.body.inputs) or "none"
                c.issue(f"carry: {name!r} is not an input of the body (inputs: {known})", node,
                        where)  # fmt: skip
                continue
            tp = _field_path_type(out, source)
            if tp is None:
                c.issue(f"carry: the body's output has no field {source!r}", node, where)
            elif not is_compatible(tp, decl.type):
                c.issue(
                    f"carry: {source or 'the output'} ({describe(tp)}) does not fit input "
                    f"{name!r} ({describe(decl.type)})",
                    node,
                    where,
                )

    def _check_condition(
        self, node: LoopNode, test: Condition, out: Any, c: Checks, where: str
    ) -> None:
        if isinstance(test, str):
            tp = _field_path_type(out, test)
            if tp is None:
                c.issue(f"the body's output has no field {test!r}", node, where)
            elif tp is not bool and tp is not Any:
                c.issue(f"{test!r} must be a bool field, it is {describe(tp)}", node, where)
            return
        if not callable(test):
            c.issue(f"{test!r} is neither a field name nor a function", node, where)
            return
        hints = type_hints(test)
        try:
            first = next(iter(inspect.signature(test).parameters), None)
        except (TypeError, ValueError):
            first = None
        param = hints.get(first, Any) if first is not None else Any
        model = _takes_model(test)
        if model is not None and _is_model(out):
            # a model of its own: the output's fields are converted to it
            missing = [
                name
                for name, info in model.model_fields.items()
                if info.is_required() and name not in out.model_fields
            ]
            if missing:
                c.issue(
                    f"the condition takes {describe(param)}, whose field(s) "
                    f"{', '.join(missing)} the body's output does not have",
                    node,
                    where,
                )
        elif not is_compatible(out, param):
            c.issue(
                f"the condition takes {describe(param)}, the body's output is {describe(out)}",
                node,
                where,
            )
        returns = hints.get("return", Any)
        if returns is not bool and returns is not Any:
            c.issue(f"the condition must return bool, not {describe(returns)}", node, where)

    def cost_s(self, node: LoopNode) -> float:
        return LLM_STEP_COST_S * self.llm_steps(node) + FUNC_COST_S * node.expected

    def llm_steps(self, node: LoopNode) -> int:
        if node.body is None:
            return 0
        body_steps = sum(kind_of(n).llm_steps(n) for n in node.body.nodes)
        return round(body_steps * node.expected)

    def label(self, node: LoopNode) -> str:
        return f"{node.id}\\nloop ≤ {node.max_iterations}"

    def imported(self, node: LoopNode) -> Iterator[Imported]:
        for name, test in (("until", node.until), ("while", node.while_)):
            if test is not None and not isinstance(test, str):
                yield Imported(f"nodes[{node.id}].{name}", test, "function")
        if node.body is not None:
            yield from graph_imports(node.body)


def _condition(text: str | None, r: FileResolver, path: DocPath) -> Condition | None:
    """A file's condition: an import path names a function, anything else a field."""
    if text is None:
        return None
    if ":" in text:
        fn: Callable[[Any], bool] = r.function(text, path)
        return fn
    return text


def _field_path_type(tp: Any, path: str) -> Any:
    """The type of a dotted field path of `tp` ('' is `tp` itself; None: no such field)."""
    for part in path.split(".") if path else ():
        tp = field_type(tp, part)
        if tp is None:
            return None
    return tp


LOOP = LoopKind()
