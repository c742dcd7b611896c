"""The Python SDK for declaring a program: `Graph` builds a `GraphSpec` node by node.

    g = Graph("research", inputs={"question": str})
    plan = g.llm("plan", "Three search queries for: {question}", output=Queries,
                 inputs={"question": g.input.question})
    hits = g.map("search", over=plan.out.queries,
                 node=step.tool(search_docs, inputs={"query": ITEM}))
    g.output(hits=hits.out)

A node's `inputs` maps each input name to a reference (`other.out.field`, `g.input.name`,
`ITEM` inside a map, `first_of(a, b)`) or to a literal value. Policy options (`retries`,
`timeout_s`, `on_error`, `fallback`, `concurrency`, ...) are keyword arguments of every
node method.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from treadle.graphs.spec import (
    INPUT,
    ITEM,
    BranchNode,
    FirstOf,
    FuncNode,
    GraphSpec,
    InputSpec,
    LLMNode,
    MapNode,
    NodeSpec,
    PlannerNode,
    Policy,
    Ref,
    SubgraphNode,
    ToolNode,
)
from treadle.tools import Tool

if TYPE_CHECKING:
    from treadle.graphs.compile import CompiledGraph


class Out:
    """A reference under construction: attribute access names a field of the output.

    `plan.out.queries.first` refers to field `first` of field `queries` of node `plan`.
    (A plain `Ref` has no such magic, so output fields may be called anything.)
    """

    __slots__ = ("_ref",)
    _ref: Ref

    def __init__(self, ref: Ref) -> None:
        object.__setattr__(self, "_ref", ref)

    def __getattr__(self, name: str) -> Out:
        if name.startswith("_"):
            raise AttributeError(name)
        return Out(Ref(self._ref.node, (*self._ref.path, name)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("references are read-only")

    def __repr__(self) -> str:
        return f"Out({self._ref})"


#: inside a `map`, the current element
ITEM_REF = Out(Ref(ITEM))


def first_of(*refs: Any) -> FirstOf:
    """The first of several references whose node ran (joins the sides of a branch)."""
    return FirstOf(tuple(_binding(r) for r in refs))


class NodeHandle:
    """What a node method returns: the node's id and a reference to its output."""

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def out(self) -> Out:
        return Out(Ref(self.spec.id))

    def __repr__(self) -> str:
        return f"<{self.spec.kind} node {self.spec.id!r}>"


def _binding(value: Any) -> Any:
    if isinstance(value, Out):
        return value._ref
    if isinstance(value, NodeHandle):
        return Ref(value.id)
    if isinstance(value, Graph):
        raise TypeError("a Graph cannot be an input value; use graph.subgraph(...)")
    return value


def _inputs(inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {name: _binding(v) for name, v in (inputs or {}).items()}


def _policy(options: dict[str, Any]) -> Policy:
    try:
        return Policy(**options)
    except TypeError as exc:
        raise TypeError(f"unknown node option: {exc}") from None


class step:
    """Node specs without a graph: the inner node of a `map` is built with these."""

    @staticmethod
    def func(
        fn: Callable[..., Any],
        *,
        inputs: Mapping[str, Any] | None = None,
        blocking: bool = False,
        id: str = "",
        **policy: Any,
    ) -> FuncNode:
        return FuncNode(
            id=id, inputs=_inputs(inputs), policy=_policy(policy), fn=fn, blocking=blocking
        )

    @staticmethod
    def tool(
        tool: Tool, *, inputs: Mapping[str, Any] | None = None, id: str = "", **policy: Any
    ) -> ToolNode:
        if not isinstance(tool, Tool):
            raise TypeError(f"expected a Tool (decorate the function with @tool), got {tool!r}")
        return ToolNode(id=id, inputs=_inputs(inputs), policy=_policy(policy), tool=tool)

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
        **policy: Any,
    ) -> LLMNode:
        return LLMNode(
            id=id,
            inputs=_inputs(inputs),
            policy=_policy(policy),
            prompt=prompt,
            model=model,
            system=system,
            output=output,
            tools=tuple(tools),
            max_turns=max_turns,
            temperature=temperature,
            max_tokens=max_tokens,
        )

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
        **policy: Any,
    ) -> PlannerNode:
        return PlannerNode(
            id=id,
            inputs=_inputs(inputs),
            policy=_policy(policy),
            prompt=prompt,
            model=model,
            system=system,
            tools=tuple(tools),
            output=output,
            max_replans=max_replans,
            joiner=joiner,
        )

    @staticmethod
    def subgraph(
        graph: Graph | GraphSpec,
        *,
        inputs: Mapping[str, Any] | None = None,
        id: str = "",
        **policy: Any,
    ) -> SubgraphNode:
        spec = graph.spec if isinstance(graph, Graph) else graph
        return SubgraphNode(id=id, inputs=_inputs(inputs), policy=_policy(policy), graph=spec)


class Graph:
    """A program under construction. `compile()` validates it into a `CompiledGraph`."""

    def __init__(
        self,
        name: str,
        *,
        inputs: Mapping[str, Any] | type[BaseModel] | None = None,
        description: str = "",
        models: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.spec = GraphSpec(
            name=name,
            inputs=_input_specs(inputs),
            description=description,
            models={alias: dict(cfg) for alias, cfg in (models or {}).items()},
        )

    @property
    def input(self) -> Out:
        """The graph's inputs: `g.input.question` refers to input `question`."""
        return Out(Ref(INPUT))

    def add(self, node: NodeSpec) -> NodeHandle:
        if not node.id:
            raise ValueError("a node added to a graph needs an id")
        self.spec.nodes.append(node)
        return NodeHandle(node)

    def func(
        self,
        id: str,
        fn: Callable[..., Any],
        *,
        inputs: Mapping[str, Any] | None = None,
        blocking: bool = False,
        **policy: Any,
    ) -> NodeHandle:
        return self.add(step.func(fn, inputs=inputs, blocking=blocking, id=id, **policy))

    def tool(
        self, id: str, tool: Tool, *, inputs: Mapping[str, Any] | None = None, **policy: Any
    ) -> NodeHandle:
        return self.add(step.tool(tool, inputs=inputs, id=id, **policy))

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
        **policy: Any,
    ) -> NodeHandle:
        return self.add(
            step.llm(
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
                **policy,
            )
        )

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
        **policy: Any,
    ) -> NodeHandle:
        return self.add(
            step.planner(
                prompt,
                tools=tools,
                inputs=inputs,
                model=model,
                system=system,
                output=output,
                max_replans=max_replans,
                joiner=joiner,
                id=id,
                **policy,
            )
        )

    def map(
        self,
        id: str,
        over: Any,
        node: NodeSpec,
        *,
        reduce: Callable[..., Any] | None = None,
        **policy: Any,
    ) -> NodeHandle:
        if not node.id:
            node.id = id
        return self.add(
            MapNode(id=id, policy=_policy(policy), over=_binding(over), node=node, reduce=reduce)
        )

    def branch(
        self,
        id: str,
        routes: Mapping[Any, Iterable[str | NodeHandle]],
        *,
        inputs: Mapping[str, Any] | None = None,
        route: Callable[..., Any] | None = None,
        default: Any = None,
        **policy: Any,
    ) -> NodeHandle:
        table = {
            route_label(label): tuple(t.id if isinstance(t, NodeHandle) else t for t in targets)
            for label, targets in routes.items()
        }
        return self.add(
            BranchNode(
                id=id,
                inputs=_inputs(inputs),
                policy=_policy(policy),
                routes=table,
                route=route,
                default=None if default is None else route_label(default),
            )
        )

    def subgraph(
        self,
        id: str,
        graph: Graph | GraphSpec,
        *,
        inputs: Mapping[str, Any] | None = None,
        **policy: Any,
    ) -> NodeHandle:
        return self.add(step.subgraph(graph, inputs=inputs, id=id, **policy))

    def output(self, **refs: Any) -> None:
        """Name the program's results: `g.output(report=summary.out.text)`."""
        self.spec.outputs.update({name: _binding(v) for name, v in refs.items()})

    def model(self, alias: str, **config: Any) -> None:
        """Declare a model alias, e.g. `g.model("fast", backend="openai_compat", ...)`."""
        self.spec.models[alias] = config

    def compile(self, *, models: Iterable[str] | None = None) -> CompiledGraph:
        from treadle.graphs.compile import compile_graph

        return compile_graph(self.spec, models=models)


def route_label(value: Any) -> str:
    """The label a branch value selects: bools are "true"/"false", enums their value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _input_specs(inputs: Mapping[str, Any] | type[BaseModel] | None) -> dict[str, InputSpec]:
    if inputs is None:
        return {}
    if isinstance(inputs, type) and issubclass(inputs, BaseModel):
        out = {}
        for name, f in inputs.model_fields.items():
            out[name] = (
                InputSpec(f.annotation) if f.is_required() else InputSpec(f.annotation, f.default)
            )
        return out
    return {name: tp if isinstance(tp, InputSpec) else InputSpec(tp) for name, tp in inputs.items()}


__all__ = ["ITEM_REF", "FirstOf", "Graph", "NodeHandle", "Out", "first_of", "route_label", "step"]
