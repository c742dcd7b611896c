"""`NodeKind`: everything the graphs layer knows about one kind of node, in one object.

Each kind module of this package (`func`, `tool`, `llm`, ...) defines:

- its spec, a `NodeSpec` dataclass (`LLMNode`): the node as data;
- its SDK methods (`g.llm(...)`, `step.llm(...)`) on mixins that `Graph` and `step` combine;
- its `NodeKind` object (`LLM`): its workflow-file fields (`fields`, a pydantic model the
  file format and `treadle schema` are made from) and how a file node becomes a spec
  (`from_file`); its validation (`describe`, `check`, `check_graph`); its static facts
  (`cost_s`, `llm_steps`, `prompted`, `tools_called`); how it is drawn; and which of its
  values were named by import path (`imported`, for the daemon's import allow-list).

The passes (compile, analysis, render, the loader, the allow-list) ask `kind_of(spec)` and
never test a node's class. The hooks every kind must decide are abstract, so a kind that
misses one cannot be instantiated (mypy says so, and so does the import of the package).
The node's executor is the one runtime piece: `treadle.runtime.nodes.<kind name>`.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from treadle.graphs.compiled import CompiledGraph, CompiledNode, Param
from treadle.graphs.kinds.file_fields import FileFields
from treadle.graphs.spec import GraphSpec, NodeSpec, SourceInfo
from treadle.tools import Tool

#: where a value sits in a parsed workflow document (mapping keys and list indices)
DocPath = tuple[str | int, ...]

#: cost estimates (seconds) used before any measurement exists
LLM_STEP_COST_S = 1.0
TOOL_COST_S = 0.5
FUNC_COST_S = 0.001

S = TypeVar("S", bound=NodeSpec)


class FileResolver(Protocol):
    """What the workflow-file loader offers a kind while it turns a file node into a spec:
    names resolved to Python objects, each problem reported at its place in the file."""

    def value(self, v: Any, path: DocPath) -> Any:
        """An input binding: a reference, {first_of: [...]}, or a literal."""

    def function(self, spec: str, path: DocPath) -> Any:
        """A callable named by import path."""

    def tool(self, name: str, path: DocPath) -> Tool:
        """A built-in tool by name, or a `Tool` by import path."""

    def resolve_type(self, text: str, path: DocPath) -> Any:
        """A type string."""

    def nested_node(
        self, m: Any, path: DocPath, default_id: str, outer: SourceInfo | None
    ) -> NodeSpec:
        """The node written at `path` inside another node, whose positions (`outer`) then
        also know the nested node's fields, as `<field>.<name>`."""

    def subgraph(self, ref: Any, path: DocPath, node_id: str) -> GraphSpec:
        """A workflow written inline, or a workflow file relative to this one."""


class Checks(Protocol):
    """What validation (`treadle.graphs.compile`) offers a kind while it checks a node."""

    known_models: frozenset[str]
    #: output type of every top-level node described so far
    out_types: dict[str, Any]

    def issue(self, message: str, node: NodeSpec | None = None, field: str | None = None) -> None:
        """Record a problem of `node` (at `field`, when given)."""

    def signature(self, node: NodeSpec, fn: Any, field: str) -> tuple[dict[str, Param], Any, bool]:
        """A callable's parameters, return type, and whether it takes **kwargs."""

    def describe(self, node: NodeSpec, item_type: Any) -> CompiledNode:
        """Another node's parameters and output type (a map's inner node)."""

    def compile_child(self, node: NodeSpec, graph: GraphSpec) -> CompiledGraph | None:
        """A nested graph, its problems reported as `node`'s (None: it has some)."""

    def binding_type(
        self, binding: Any, node: NodeSpec, where: str, item_type: Any, deps: list[str]
    ) -> Any:
        """The type a binding delivers (None: unknown because of a reported problem); the
        nodes it reads are added to `deps`."""

    def check_node(
        self, node: NodeSpec, cn: CompiledNode, item_type: Any, prefix: str = ""
    ) -> list[str]:
        """Check another node's bindings and options; the node ids it reads."""

    def static_type(self, binding: Any) -> Any:
        """The type a binding delivers as far as it is known, without reporting anything."""


class Prompted(Protocol):
    """A node that prompts a model (an `llm` or a `planner`): what prefix grouping, pinning
    and model checks read."""

    @property
    def prompt(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def system(self) -> str | None: ...
    @property
    def tools(self) -> tuple[Tool, ...]: ...


@dataclass(frozen=True)
class Imported:
    """A Python object a node's definition named by import path (a function, a tool or a
    type): what the daemon's import allow-list checks after loading."""

    #: the field, as `nodes[id].fn` (`graph` names the workflow that holds the node)
    where: str
    value: Any
    role: Literal["function", "tool", "type"]
    graph: str | None = None


class NodeKind(ABC, Generic[S]):
    """One kind of node (see the module docstring). Hooks without a body here are the
    decisions every kind makes; the others have the answer most kinds give."""

    #: the spec dataclass; its `kind` ClassVar is the kind's name
    spec: type[S]
    #: the kind's own fields in a workflow file
    fields: type[FileFields]
    #: docstrings of the kind's file models (at the top level, and inside a map)
    file_doc: str
    inner_file_doc: str
    #: whether the node binds `inputs` of its own (a map does not: its inner node does)
    has_inputs: ClassVar[bool] = True
    #: Mermaid's brackets around the node's text, and Graphviz's node attributes
    mermaid: ClassVar[tuple[str, str]] = ('["', '"]')
    dot: ClassVar[str] = "shape=component"

    @property
    def name(self) -> str:
        return self.spec.kind

    # -- workflow files ----------------------------------------------------------------

    @abstractmethod
    def from_file(self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath) -> S:
        """The spec of a validated file node `m` (of `fields`); `common` holds the fields
        every node has (id, inputs, options, source)."""

    # -- validation --------------------------------------------------------------------

    @abstractmethod
    def describe(self, node: S, c: Checks, item_type: Any) -> CompiledNode:
        """Parameters and output type of a node (before its bindings are checked)."""

    def check(
        self,
        node: S,
        cn: CompiledNode,
        c: Checks,
        item_type: Any,
        prefix: str,
        deps: list[str],
    ) -> None:
        """The kind's own checks of one node (`prefix` comes before field names inside a
        map); nodes it reads beyond its inputs are added to `deps`."""

    def check_graph(self, node: S, c: Checks, by_id: Mapping[str, NodeSpec]) -> None:
        """Checks that need the whole graph (a branch's routes)."""

    def unused_input(self, node: S, name: str, params: Mapping[str, Param]) -> str:
        """What is wrong with an input the node does not declare."""
        expected = ", ".join(params) or "none"
        return f"unknown input {name!r} (expected: {expected})"

    def control_edges(self, node: S) -> Iterable[tuple[str, str]]:
        """(label, target): nodes that run only when this node chooses `label`."""
        return ()

    def bindings(self, node: S) -> Iterator[tuple[str, Any]]:
        """Every (name, binding) the node reads, nested nodes' included."""
        yield from node.inputs.items()

    # -- static facts ------------------------------------------------------------------

    @abstractmethod
    def cost_s(self, node: S) -> float:
        """Estimated seconds the node takes, before any measurement."""

    @abstractmethod
    def llm_steps(self, node: S) -> int:
        """LLM steps the node contributes to a path (a map counts once: it is parallel)."""

    def prompted(self, node: S) -> Prompted | None:
        """The model-prompting node this is, or runs once per element (None: none)."""
        return None

    def tools_called(self, node: S) -> tuple[str, ...]:
        """Tools the node itself calls when it runs (not those it offers a model)."""
        return ()

    # -- drawing -----------------------------------------------------------------------

    def label(self, node: S) -> str:
        """The node's text in a drawing (`\\n` separates lines)."""
        return f"{node.id}\\n{node.kind}"

    # -- imports -----------------------------------------------------------------------

    @abstractmethod
    def imported(self, node: S) -> Iterator[Imported]:
        """Objects the node's fields name by import path (nested nodes' included)."""


# -- the registry ------------------------------------------------------------------------

_BY_SPEC: dict[type[NodeSpec], NodeKind[Any]] = {}


def register(*kinds: NodeKind[Any]) -> tuple[NodeKind[Any], ...]:
    """Make `kinds` known to `kind_of` (the package does this once, for every kind)."""
    for kind in kinds:
        _BY_SPEC[kind.spec] = kind
    return kinds


def kind_of(node: NodeSpec) -> NodeKind[Any]:
    """The kind of a node spec (TypeError for a spec class no kind defines)."""
    try:
        return _BY_SPEC[type(node)]
    except KeyError:
        raise TypeError(f"{type(node).__name__} is not a node kind") from None


def graph_imports(graph: GraphSpec) -> Iterator[Imported]:
    """Every object a graph's definition names by import path: its inputs' types and its
    nodes' fields, nested graphs' included (each labelled with its own graph's name)."""
    for name, decl in graph.inputs.items():
        yield Imported(f"inputs.{name}", decl.type, "type", graph.name)
    for node in graph.nodes:
        for ref in node_imports(node):
            yield ref if ref.graph is not None else _in(ref, graph.name)


def node_imports(node: NodeSpec) -> Iterator[Imported]:
    """What a node's definition names by import path: its kind's fields, and its
    `on_error` handler's."""
    yield from kind_of(node).imported(node)
    handler = node.options.handler
    if isinstance(handler, NodeSpec):
        yield from node_imports(handler)


def _in(ref: Imported, graph: str) -> Imported:
    return Imported(ref.where, ref.value, ref.role, graph)


def prompt_params(node: Prompted, spec: NodeSpec, c: Checks) -> dict[str, Param]:
    """A prompting node's inputs: the fields its prompt and system templates use."""
    names = template_fields(node.prompt, spec, c, "prompt")
    if node.system:
        names |= template_fields(node.system, spec, c, "system")
    return {name: Param(Any, True) for name in sorted(names)}


def check_model(node: Prompted, spec: NodeSpec, c: Checks, prefix: str) -> None:
    """A prompting node's model alias must be one the graph or the runtime provides."""
    if node.model not in c.known_models:
        known = ", ".join(sorted(c.known_models))
        c.issue(f"unknown model alias {node.model!r} (known: {known})", spec, prefix + "model")


def unused_by_prompt(name: str) -> str:
    return f"input {name!r} is not used by the prompt or system"


def template_fields(text: str, node: NodeSpec, c: Checks, where: str) -> set[str]:
    """The input names a prompt template uses (`{question}`); bad templates are issues."""
    names: set[str] = set()
    try:
        for _, fname, _, _ in string.Formatter().parse(text):
            if fname is None:
                continue
            root = fname.split(".", 1)[0].split("[", 1)[0]
            if not root or root.isdigit():
                c.issue("template fields must be named, e.g. {question}", node, where)
            else:
                names.add(root)
    except ValueError as exc:
        c.issue(f"bad template: {exc}", node, where)
    return names
