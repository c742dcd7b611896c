"""The Python SDK for declaring a program: `Graph` builds a `GraphSpec` node by node.

    g = Graph("research", inputs={"question": str})
    plan = g.llm("plan", "Three search queries for: {question}", output=Queries,
                 inputs={"question": g.input.question})
    hits = g.map("search", over=plan.out.queries,
                 node=step.tool(search_docs, inputs={"query": ITEM}))
    g.output(hits=hits.out)

A node's `inputs` maps each input name to a reference (`other.out.field`, `g.input.name`,
`ITEM` and `INDEX` inside a map, `ERROR` inside an error handler, `first_of(a, b)`) or to a
literal value. Node options (`retries`, `timeout_s`, `on_error`, `handler`, `fallback`,
`concurrency`, `cache`, ...: `NodeOptions`) are keyword arguments of every node method.
The node methods themselves are defined with their kinds (`treadle.graphs.kinds`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from treadle.graphs.compile import CompiledGraph, compile_graph
from treadle.graphs.handles import (
    ERROR_REF,
    INDEX_REF,
    ITEM_REF,
    NodeHandle,
    Out,
    binding,
    first_of,
)
from treadle.graphs.kinds import KindMethods, KindSteps, route_label
from treadle.graphs.spec import INPUT, FirstOf, GraphSpec, InputSpec, NodeSpec, Ref


class step(KindSteps):
    """Node specs without a graph: the inner node of a `map` is built with these."""


class Graph(KindMethods):
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

    def output(self, **refs: Any) -> None:
        """Name the program's results: `g.output(report=summary.out.text)`."""
        self.spec.outputs.update({name: binding(v) for name, v in refs.items()})

    def model(self, alias: str, **config: Any) -> None:
        """Declare a model alias, e.g. `g.model("fast", backend="openai_compat", ...)`."""
        self.spec.models[alias] = config

    def compile(self, *, models: Iterable[str] | None = None) -> CompiledGraph:
        return compile_graph(self.spec, models=models)


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


__all__ = [
    "ERROR_REF",
    "INDEX_REF",
    "ITEM_REF",
    "FirstOf",
    "Graph",
    "NodeHandle",
    "Out",
    "first_of",
    "route_label",
    "step",
]
