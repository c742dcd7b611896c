"""A declared graph's outline: what a viewer draws and fills in (the graph's name, inputs
and outputs, each node's id, kind, drawing label and input bindings, and the edges),
without the graph's types.

A graph loaded from a workflow file carries types made at load time, which cannot leave
the process that made them (pickle finds them by name). The daemon loads tenants'
definitions in a child process, so its web view asks that process for an outline, which
crosses the pipe as plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treadle.graphs.kinds import kind_of
from treadle.graphs.render import graph_edges
from treadle.graphs.spec import GraphSpec

__all__ = ["GraphOutline", "NodeOutline", "outline_of"]


@dataclass(frozen=True)
class NodeOutline:
    id: str
    kind: str
    #: the node's text in a drawing (`\\n` separates lines)
    label: str
    #: input name -> binding: a literal, a `Ref` or a `FirstOf`
    inputs: dict[str, Any]


@dataclass(frozen=True)
class GraphOutline:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[NodeOutline, ...]
    #: (source, target, label, is_control); the graph's inputs come from `__input__` and
    #: its outputs go to `__output__`
    edges: tuple[tuple[str, str, str, bool], ...]


def outline_of(spec: GraphSpec) -> GraphOutline:
    return GraphOutline(
        name=spec.name,
        inputs=tuple(spec.inputs),
        outputs=tuple(spec.outputs),
        nodes=tuple(
            NodeOutline(node.id, node.kind, kind_of(node).label(node), dict(node.inputs))
            for node in spec.nodes
        ),
        edges=tuple(graph_edges(spec)),
    )
