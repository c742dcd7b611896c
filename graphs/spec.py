"""The declared program as data: `GraphSpec` and its node kinds.

Both the Python SDK (`treadle.graphs.builder`) and the workflow-file loader
(`treadle.graphs.files.loader`) produce these objects, with references already resolved to
Python objects (functions, `Tool`s, types). Two specs that describe the same program
compare equal; where a spec came from (`source`) does not take part in the comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from treadle.tools import Tool

#: the pseudo-node that stands for the graph's inputs in a `Ref`
INPUT = "$input"
#: the pseudo-node that stands for the current element inside a `map`
ITEM = "$item"

ErrorPolicy = Literal["fail", "skip", "fallback"]
NodeKind = Literal["func", "tool", "llm", "map", "branch", "subgraph", "planner"]


@dataclass(frozen=True)
class Pos:
    """A place in a workflow file (1-based line and column)."""

    file: str | None
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file or '<input>'}:{self.line}:{self.col}"


@dataclass(frozen=True)
class SourceInfo:
    """Where a node (and each of its fields, by dotted name) was written."""

    pos: Pos
    fields: dict[str, Pos] = field(default_factory=dict, hash=False)

    def at(self, dotted: str) -> Pos:
        """The most precise known position of `dotted` (falls back to its parents)."""
        while dotted:
            if dotted in self.fields:
                return self.fields[dotted]
            dotted = dotted.rpartition(".")[0]
        return self.pos


@dataclass(frozen=True)
class Ref:
    """A reference to a node's output, or to a field inside it (`path`).

    `Ref("plan", ("queries",))` is `$plan.queries` in a workflow file; in the SDK,
    `plan.out.queries` builds the same reference.
    """

    node: str
    path: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "$" + ".".join((self.node.lstrip("$"), *self.path))


@dataclass(frozen=True)
class FirstOf:
    """The first of several references whose node finished (was not skipped).

    This is how the two sides of a `branch` join again.
    """

    refs: tuple[Ref, ...]


@dataclass
class Policy:
    """How a node is retried, timed out and failed."""

    retries: int = 0
    backoff_s: float = 0.1
    backoff_max_s: float = 10.0
    jitter: float = 0.5
    timeout_s: float | None = None
    on_error: ErrorPolicy = "fail"
    fallback: Any = None
    concurrency: int | None = None


@dataclass
class NodeSpec:
    """Fields every node kind has. `inputs` maps an input name to a `Ref`, `FirstOf` or a
    literal value."""

    id: str
    inputs: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    source: SourceInfo | None = field(default=None, compare=False, repr=False)

    kind: ClassVar[NodeKind]


@dataclass
class FuncNode(NodeSpec):
    """A Python function; its parameters are the inputs, its return value the output.

    Sync functions run on the event loop (they should be quick); set `blocking=True` to run
    one in a worker thread instead.
    """

    fn: Callable[..., Any] = field(default=lambda: None)
    blocking: bool = False
    kind: ClassVar[NodeKind] = "func"


@dataclass
class ToolNode(NodeSpec):
    """A call to a tool with bound arguments."""

    tool: Tool | None = None
    kind: ClassVar[NodeKind] = "tool"


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
    kind: ClassVar[NodeKind] = "llm"


@dataclass
class MapNode(NodeSpec):
    """Run `node` once per element of `over` (bound to `$item` inside it), then collect the
    outputs in order, optionally folding them with `reduce(list) -> value`."""

    over: Any = None
    node: NodeSpec | None = None
    reduce: Callable[..., Any] | None = None
    kind: ClassVar[NodeKind] = "map"


@dataclass
class BranchNode(NodeSpec):
    """Choose a route. `route(**inputs)` returns a label (without `route`, the single
    input's value is the label); the nodes listed under that label in `routes` run, those
    listed only under other labels are skipped. The output is the chosen label."""

    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    route: Callable[..., Any] | None = None
    default: str | None = None
    kind: ClassVar[NodeKind] = "branch"


@dataclass
class SubgraphNode(NodeSpec):
    """Another graph used as one node; its inputs are the subgraph's inputs."""

    graph: GraphSpec | None = None
    kind: ClassVar[NodeKind] = "subgraph"


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
    kind: ClassVar[NodeKind] = "planner"


NODE_KINDS: dict[str, type[NodeSpec]] = {
    cls.kind: cls
    for cls in (FuncNode, ToolNode, LLMNode, MapNode, BranchNode, SubgraphNode, PlannerNode)
}

_MISSING: Any = object()


@dataclass
class InputSpec:
    """A declared graph input: its type and, optionally, a default."""

    type: Any = Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass
class GraphSpec:
    """A whole program: typed inputs, nodes, outputs, and the model aliases it declares.

    `models` maps an alias to a backend configuration (`{"backend": "scripted", ...}`);
    aliases may also be supplied by the runtime instead.
    """

    name: str
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    nodes: list[NodeSpec] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    source: SourceInfo | None = field(default=None, compare=False, repr=False)

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)
