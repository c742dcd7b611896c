"""The SDK's references under construction: what node methods return (`NodeHandle`), how an
output field is named (`node.out.field`), and how method arguments become spec bindings.

The node methods themselves (`g.llm`, `step.tool`, ...) live with their kinds in
`treadle.graphs.kinds`, on `NodeAdder` mixins that `treadle.graphs.builder.Graph` combines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from treadle.graphs.spec import ERROR, INDEX, ITEM, FirstOf, NodeSpec, Ref


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
#: inside a `map`, the current element's index (0, 1, ...)
INDEX_REF = Out(Ref(INDEX))
#: inside an `on_error` handler, the error it handles (`ErrorInfo`: type, message, node,
#: attempt; `ERROR.message` names one field)
ERROR_REF = Out(Ref(ERROR))


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


class NodeAdder(ABC):
    """A graph under construction, as the kinds' node methods see it."""

    @abstractmethod
    def add(self, node: NodeSpec) -> NodeHandle:
        """Add a node spec (with its id set) and return its handle."""


def first_of(*refs: Any) -> FirstOf:
    """The first of several references whose node ran (joins the sides of a branch)."""
    return FirstOf(tuple(binding(r) for r in refs))


def binding(value: Any) -> Any:
    """An SDK argument as a spec binding: a reference becomes a `Ref`, a literal stays."""
    if isinstance(value, Out):
        return value._ref
    if isinstance(value, NodeHandle):
        return Ref(value.id)
    if isinstance(value, NodeAdder):
        raise TypeError("a Graph cannot be an input value; use graph.subgraph(...)")
    return value


def bindings(inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {name: binding(v) for name, v in (inputs or {}).items()}
