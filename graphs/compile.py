"""Validation: a `GraphSpec` becomes a `CompiledGraph` or a `GraphValidationError`.

Every problem found is collected (not only the first): duplicate or malformed ids, inputs
unbound or unknown, references to missing nodes or fields, type mismatches along edges,
cycles, nodes not connected to anything, branch routes that can never be taken, unknown
model aliases, bad policies. Each names the node and field and, for workflow files, the
file, line and column.
"""

from __future__ import annotations

import enum
import inspect
import string
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, create_model

from treadle.errors import GraphError
from treadle.graphs.analysis import GraphFacts, _llm_spec, analyze
from treadle.graphs.spec import (
    INPUT,
    ITEM,
    BranchNode,
    FirstOf,
    FuncNode,
    GraphSpec,
    LLMNode,
    MapNode,
    NodeSpec,
    PlannerNode,
    Pos,
    Ref,
    SubgraphNode,
    ToolNode,
)
from treadle.graphs.typecheck import (
    _is_model,
    describe,
    element_type,
    field_type,
    is_compatible,
)

#: the alias every runtime provides (the scripted backend unless configured otherwise)
DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class GraphIssue:
    message: str
    node: str | None = None
    field: str | None = None
    pos: Pos | None = None

    def __str__(self) -> str:
        where = f"{self.pos}: " if self.pos else ""
        what = []
        if self.node:
            what.append(f"node {self.node!r}")
        if self.field:
            what.append(f"field {self.field!r}")
        return where + (", ".join(what) + ": " if what else "") + self.message


class GraphValidationError(GraphError, ValueError):
    """The graph is not a valid program; `issues` lists every problem found."""

    def __init__(self, graph: str, issues: list[GraphIssue]):
        self.graph = graph
        self.issues = issues
        lines = "\n".join(f"  {i}" for i in issues)
        super().__init__(f"graph {graph!r} is invalid ({len(issues)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class Param:
    type: Any
    required: bool


@dataclass
class CompiledNode:
    """A validated node with everything the orchestrator needs precomputed."""

    id: str
    spec: NodeSpec
    params: dict[str, Param]
    output_type: Any
    deps: tuple[str, ...] = ()
    dependents: tuple[str, ...] = ()
    #: (branch id, labels under which this node runs)
    guards: tuple[tuple[str, frozenset[str]], ...] = ()
    #: a map's inner node
    inner: CompiledNode | None = None
    #: a subgraph node's (or a map-over-subgraph's) compiled child
    child: CompiledGraph | None = None
    accepts_extra: bool = False

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass
class CompiledGraph:
    spec: GraphSpec
    nodes: dict[str, CompiledNode]
    #: node ids in a topological order
    order: tuple[str, ...]
    input_model: type[BaseModel]
    output_type: Any
    facts: GraphFacts
    models: frozenset[str] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return self.spec.name

    def all_models(self) -> set[str]:
        """Model aliases used here and in every nested subgraph."""
        out = set(self.models)
        for node in self.nodes.values():
            if node.child is not None:
                out |= node.child.all_models()
        return out


def compile_graph(spec: GraphSpec, *, models: Iterable[str] | None = None) -> CompiledGraph:
    """Validate `spec` and precompute its execution plan and static facts.

    `models` are the aliases the runtime will provide besides those the graph declares;
    "default" is always known.
    """
    known = {DEFAULT_MODEL, *spec.models, *(models or ())}
    return _Compiler(spec, frozenset(known)).run()


class _Compiler:
    def __init__(self, spec: GraphSpec, known_models: frozenset[str]):
        self.spec = spec
        self.known_models = known_models
        self.issues: list[GraphIssue] = []
        self.out_types: dict[str, Any] = {}

    # -- reporting ---------------------------------------------------------------------

    def issue(self, message: str, node: NodeSpec | None = None, field: str | None = None) -> None:
        pos = None
        if node is not None and node.source is not None:
            pos = node.source.at(field or "")
        elif self.spec.source is not None:
            pos = self.spec.source.at(field or "")
        self.issues.append(GraphIssue(message, node.id if node else None, field, pos))

    # -- main --------------------------------------------------------------------------

    def run(self) -> CompiledGraph:
        spec = self.spec
        by_id: dict[str, NodeSpec] = {}
        for node in spec.nodes:
            if not node.id or node.id.startswith("$") or any(c in node.id for c in ".[]$ "):
                self.issue("node ids must be non-empty and free of '.', '[', ']', '$', ' '", node)
            if node.id in by_id:
                self.issue("duplicate node id", node, "id")
            by_id[node.id] = node

        compiled: dict[str, CompiledNode] = {}
        for node in spec.nodes:
            compiled[node.id] = self.describe(node, item_type=None)
            self.out_types[node.id] = compiled[node.id].output_type

        for node in spec.nodes:
            self.check_node(node, compiled[node.id], by_id, item_type=None)

        guards = self.check_branches(by_id)
        for node_id, table in guards.items():
            if node_id in compiled:
                compiled[node_id].guards = tuple((b, frozenset(ls)) for b, ls in table.items())
                compiled[node_id].deps = tuple(dict.fromkeys((*compiled[node_id].deps, *table)))

        dependents: dict[str, list[str]] = {n: [] for n in compiled}
        for n in compiled.values():
            for d in n.deps:
                if d in dependents:
                    dependents[d].append(n.id)
        for n in compiled.values():
            n.dependents = tuple(dependents[n.id])
        order = self.check_cycles(compiled)

        output_type = self.check_outputs(compiled)
        self.check_connected(compiled)
        input_model = self.input_model()
        if self.issues:
            raise GraphValidationError(spec.name, self.issues)
        ordered = {nid: compiled[nid] for nid in order}
        return CompiledGraph(
            spec=spec,
            nodes=ordered,
            order=tuple(order),
            input_model=input_model,
            output_type=output_type,
            facts=analyze(ordered),
            models=frozenset(  # LLM and planner nodes, a map's inner one included
                s.model for n in ordered.values() if (s := _llm_spec(n.spec)) is not None
            ),
        )

    # -- per node ----------------------------------------------------------------------

    def describe(self, node: NodeSpec, item_type: Any) -> CompiledNode:
        """Parameters and output type of a node (before its bindings are checked)."""
        if isinstance(node, FuncNode):
            params, out, extra = self.signature(node, node.fn, "fn")
            return CompiledNode(node.id, node, params, out, accepts_extra=extra)
        if isinstance(node, ToolNode):
            if node.tool is None:
                self.issue("no tool given", node, "tool")
                return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
            params = {
                name: Param(f.annotation, f.is_required())
                for name, f in node.tool.input_model.model_fields.items()
            }
            return CompiledNode(node.id, node, params, node.tool.output_type)
        if isinstance(node, LLMNode | PlannerNode):
            names = _template_fields(node.prompt, node, self, "prompt")
            if node.system:
                names |= _template_fields(node.system, node, self, "system")
            params = {name: Param(Any, True) for name in sorted(names)}
            return CompiledNode(node.id, node, params, node.output)
        if isinstance(node, BranchNode):
            if node.route is not None:
                params, _, extra = self.signature(node, node.route, "route")
                return CompiledNode(node.id, node, params, str, accepts_extra=extra)
            params = {name: Param(Any, True) for name in node.inputs}
            return CompiledNode(node.id, node, params, str)
        if isinstance(node, SubgraphNode):
            if node.graph is None:
                self.issue("no graph given", node, "graph")
                return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
            try:
                child = compile_graph(node.graph, models=self.known_models)
            except GraphValidationError as exc:
                for sub in exc.issues:
                    self.issues.append(
                        GraphIssue(
                            f"in subgraph {node.graph.name!r}: {sub.message}",
                            f"{node.id}/{sub.node}" if sub.node else node.id,
                            sub.field,
                            sub.pos or (node.source.at("graph") if node.source else None),
                        )
                    )
                return CompiledNode(node.id, node, {}, Any, accepts_extra=True)
            params = {
                name: Param(decl.type, decl.required) for name, decl in node.graph.inputs.items()
            }
            return CompiledNode(node.id, node, params, child.output_type, child=child)
        if isinstance(node, MapNode):
            if node.node is None:
                self.issue("a map needs an inner node", node, "node")
                return CompiledNode(node.id, node, {}, list[Any])
            inner = self.describe(node.node, item_type)
            collected: Any = list[inner.output_type]  # type: ignore[name-defined]
            if node.reduce is not None:
                collected = _hints(node.reduce).get("return", Any)
            return CompiledNode(node.id, node, {}, collected, inner=inner, child=inner.child)
        self.issue(f"unknown node kind {type(node).__name__}", node)
        return CompiledNode(node.id, node, {}, Any)

    def signature(self, node: NodeSpec, fn: Any, field: str) -> tuple[dict[str, Param], Any, bool]:
        if not callable(fn):
            self.issue(f"{fn!r} is not callable", node, field)
            return {}, Any, True
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return {}, Any, True
        hints = _hints(fn)
        params: dict[str, Param] = {}
        extra = False
        for name, p in sig.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                extra = True
            elif p.kind is p.VAR_POSITIONAL:
                continue
            else:
                params[name] = Param(hints.get(name, Any), p.default is inspect.Parameter.empty)
        return params, hints.get("return", Any), extra

    def check_node(
        self,
        node: NodeSpec,
        cn: CompiledNode,
        by_id: dict[str, NodeSpec],
        item_type: Any,
        prefix: str = "",
    ) -> list[str]:
        """Check bindings and policy; return the node ids this node reads from."""
        deps: list[str] = []
        p = node.policy
        if p.retries < 0:
            self.issue("retries must be >= 0", node, prefix + "retries")
        if p.timeout_s is not None and p.timeout_s <= 0:
            self.issue("timeout_s must be > 0", node, prefix + "timeout_s")
        if p.concurrency is not None and p.concurrency < 1:
            self.issue("concurrency must be >= 1", node, prefix + "concurrency")
        if p.on_error not in ("fail", "skip", "fallback"):
            self.issue("on_error must be one of fail, skip, fallback", node, prefix + "on_error")
        if not 0 <= p.jitter <= 1:
            self.issue("jitter must be between 0 and 1", node, prefix + "jitter")

        if isinstance(node, LLMNode | PlannerNode) and node.model not in self.known_models:
            known = ", ".join(sorted(self.known_models))
            self.issue(
                f"unknown model alias {node.model!r} (known: {known})", node, prefix + "model"
            )
        if isinstance(node, PlannerNode):
            if not node.tools:
                self.issue("a planner needs at least one tool", node, prefix + "tools")
            if node.max_replans < 0:
                self.issue("max_replans must be >= 0", node, prefix + "max_replans")
        if isinstance(node, LLMNode):
            if not (node.output is str or _is_model(node.output) or node.output is Any):
                self.issue(
                    "output must be str or a pydantic model, got " + describe(node.output),
                    node,
                    prefix + "output",
                )
            if node.max_turns < 1:
                self.issue("max_turns must be >= 1", node, prefix + "max_turns")

        if isinstance(node, MapNode):
            src = self.binding_type(node.over, node, prefix + "over", by_id, item_type, deps)
            elem = element_type(src) if src is not None else Any
            if src is not None and elem is None:
                self.issue(f"map needs a list to iterate over, got {describe(src)}", node, "over")
            if cn.inner is not None and node.node is not None:
                deps += self.check_node(node.node, cn.inner, by_id, elem or Any, prefix="node.")
            if node.reduce is not None and not callable(node.reduce):
                self.issue("reduce must be callable", node, prefix + "reduce")
            cn.deps = tuple(dict.fromkeys(deps))
            return deps

        for name, binding in node.inputs.items():
            where = f"{prefix}inputs.{name}"
            param = cn.params.get(name)
            if param is None and not cn.accepts_extra:
                if isinstance(node, LLMNode | PlannerNode):
                    self.issue(f"input {name!r} is not used by the prompt or system", node, where)
                else:
                    expected = ", ".join(cn.params) or "none"
                    self.issue(f"unknown input {name!r} (expected: {expected})", node, where)
            src = self.binding_type(binding, node, where, by_id, item_type, deps)
            if param is not None and src is not None and not is_compatible(src, param.type):
                self.issue(
                    f"type mismatch: {describe(src)} is bound to an input of type "
                    f"{describe(param.type)}",
                    node,
                    where,
                )
        for name, param in cn.params.items():
            if param.required and name not in node.inputs:
                self.issue(f"input {name!r} is not bound", node, f"{prefix}inputs")
        if isinstance(node, BranchNode) and node.route is None and len(node.inputs) != 1:
            self.issue("a branch without `route` takes exactly one input", node, "inputs")
        cn.deps = tuple(dict.fromkeys(deps))
        return deps

    def binding_type(
        self,
        binding: Any,
        node: NodeSpec,
        where: str,
        by_id: dict[str, NodeSpec],
        item_type: Any,
        deps: list[str],
    ) -> Any:
        """The type a binding delivers (`None` when unknown because of an issue)."""
        if isinstance(binding, FirstOf):
            if not binding.refs:
                self.issue("first_of needs at least one reference", node, where)
                return None
            types_ = [self.ref_type(r, node, where, by_id, item_type, deps) for r in binding.refs]
            if any(t is None for t in types_):
                return None
            return types_[0] if len(set(map(repr, types_))) == 1 else Union[tuple(types_)]  # noqa: UP007
        if isinstance(binding, Ref):
            return self.ref_type(binding, node, where, by_id, item_type, deps)
        if isinstance(binding, str | int | bool) and not isinstance(binding, enum.Enum):
            return Literal[binding]  # a literal fits a Literal input that lists its value
        return type(binding) if binding is not None else Any

    def ref_type(
        self,
        ref: Ref,
        node: NodeSpec,
        where: str,
        by_id: dict[str, NodeSpec],
        item_type: Any,
        deps: list[str],
    ) -> Any:
        path = list(ref.path)
        if ref.node == INPUT:
            if not path:
                self.issue("refer to one input: $input.NAME", node, where)
                return None
            name = path.pop(0)
            decl = self.spec.inputs.get(name)
            if decl is None:
                declared = ", ".join(self.spec.inputs) or "none"
                self.issue(f"unknown graph input {name!r} (declared: {declared})", node, where)
                return None
            tp = decl.type
        elif ref.node == ITEM:
            if item_type is None:
                self.issue("$item is only defined inside a map", node, where)
                return None
            tp = item_type
        else:
            if ref.node not in by_id:
                self.issue(f"reference to unknown node {ref.node!r}", node, where)
                return None
            if ref.node == node.id and item_type is None:
                self.issue("a node cannot read its own output", node, where)
                return None
            deps.append(ref.node)
            tp = self.out_types.get(ref.node, Any)
        walked: list[str] = []
        for part in path:
            nxt = field_type(tp, part)
            if nxt is None:
                owner = ref.node if not walked else f"{ref.node}.{'.'.join(walked)}"
                self.issue(f"{owner} ({describe(tp)}) has no field {part!r}", node, where)
                return None
            walked.append(part)
            tp = nxt
        return tp

    # -- graph-wide --------------------------------------------------------------------

    def check_branches(self, by_id: dict[str, NodeSpec]) -> dict[str, dict[str, set[str]]]:
        """Validate routes; return for each guarded node {branch id: allowed labels}."""
        guards: dict[str, dict[str, set[str]]] = {}
        for node in self.spec.nodes:
            if not isinstance(node, BranchNode):
                continue
            if not node.routes:
                self.issue("a branch needs at least one route", node, "routes")
            possible = self.possible_labels(node)
            for label, targets in node.routes.items():
                if possible is not None and label not in possible:
                    options = ", ".join(sorted(possible))
                    self.issue(
                        f"route {label!r} can never be taken (possible: {options})",
                        node,
                        f"routes.{label}",
                    )
                for target in targets:
                    if target not in by_id:
                        self.issue(
                            f"route target {target!r} is not a node", node, f"routes.{label}"
                        )
                    elif target == node.id:
                        self.issue("a branch cannot route to itself", node, f"routes.{label}")
                    else:
                        guards.setdefault(target, {}).setdefault(node.id, set()).add(label)
            if node.default is not None and node.default not in node.routes:
                self.issue(f"default route {node.default!r} is not a route", node, "default")
        return guards

    def possible_labels(self, node: BranchNode) -> set[str] | None:
        if node.route is not None:
            tp = _hints(node.route).get("return", Any)
        elif len(node.inputs) == 1:
            (binding,) = node.inputs.values()
            tp = self.out_types.get(binding.node) if isinstance(binding, Ref) else None
            if isinstance(binding, Ref) and binding.node not in (INPUT, ITEM):
                for part in binding.path:
                    tp = field_type(tp, part) if tp is not None else None
            elif isinstance(binding, Ref) and binding.node == INPUT and binding.path:
                decl = self.spec.inputs.get(binding.path[0])
                tp = decl.type if decl and len(binding.path) == 1 else None
        else:
            return None
        return _labels_of(tp)

    def check_cycles(self, compiled: dict[str, CompiledNode]) -> list[str]:
        """A topological order of `compiled` (its `dependents` set); a cycle is an issue."""
        indegree = {nid: sum(d in compiled for d in n.deps) for nid, n in compiled.items()}
        ready = [n for n in compiled if indegree[n] == 0]
        order: list[str] = []
        while ready:
            cur = ready.pop(0)
            order.append(cur)
            for c in compiled[cur].dependents:
                indegree[c] -= 1
                if indegree[c] == 0:
                    ready.append(c)
        if len(order) < len(compiled):
            stuck = [n for n in compiled if n not in order]
            cycle = _find_cycle(stuck, compiled)
            first = compiled[cycle[0]].spec
            self.issue("cycle: " + " -> ".join([*cycle, cycle[0]]), first, "inputs")
            order += stuck
        return order

    def check_outputs(self, compiled: dict[str, CompiledNode]) -> Any:
        if not self.spec.outputs:
            sinks = [n for n in compiled.values() if not n.dependents]
            sink_fields: dict[str, Any] = {
                n.id: (typing.Optional[n.output_type], None)  # noqa: UP045
                for n in sinks
            }
            return create_model(f"{_ident(self.spec.name)}_result", **sink_fields)
        by_id = {n.id: n.spec for n in compiled.values()}
        fields: dict[str, Any] = {}
        holder = NodeSpec(id="", source=self.spec.source)
        for name, binding in self.spec.outputs.items():
            tp = self.binding_type(binding, holder, f"outputs.{name}", by_id, None, [])
            if isinstance(binding, FirstOf | Ref) or binding is not None:
                fields[name] = (tp if tp is not None else Any, ...)
        return create_model(f"{_ident(self.spec.name)}_outputs", **fields)

    def check_connected(self, compiled: dict[str, CompiledNode]) -> None:
        if len(compiled) < 2:
            return
        output_nodes = {
            r.node
            for b in self.spec.outputs.values()
            for r in (b.refs if isinstance(b, FirstOf) else (b,) if isinstance(b, Ref) else ())
        }
        for n in compiled.values():
            reads_refs = _reads_any_ref(n.spec)
            if not n.deps and not n.dependents and not reads_refs and n.id not in output_nodes:
                self.issue(
                    "not connected: it reads no input or node and nothing uses its output",
                    n.spec,
                )

    def input_model(self) -> type[BaseModel]:
        fields = {
            name: (decl.type, ... if decl.required else decl.default)
            for name, decl in self.spec.inputs.items()
        }
        # an input the graph does not declare is almost always a typo: refuse it
        return create_model(  # type: ignore[call-overload]
            f"{_ident(self.spec.name)}_inputs", __config__=ConfigDict(extra="forbid"), **fields
        )


# -- helpers ---------------------------------------------------------------------------


def _template_fields(text: str, node: NodeSpec, comp: _Compiler, where: str) -> set[str]:
    names: set[str] = set()
    try:
        for _, fname, _, _ in string.Formatter().parse(text):
            if fname is None:
                continue
            root = fname.split(".", 1)[0].split("[", 1)[0]
            if not root or root.isdigit():
                comp.issue("template fields must be named, e.g. {question}", node, where)
            else:
                names.add(root)
    except ValueError as exc:
        comp.issue(f"bad template: {exc}", node, where)
    return names


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        # a callable object: its __call__ carries the annotations
        target = type(fn).__call__ if not inspect.isroutine(fn) and callable(fn) else None
        try:
            return typing.get_type_hints(target) if target is not None else {}
        except Exception:
            return {}


def _labels_of(tp: Any) -> set[str] | None:
    if tp is bool:
        return {"true", "false"}
    if get_origin(tp) is Literal:
        from treadle.graphs.builder import route_label

        return {route_label(v) for v in get_args(tp)}
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        return {str(m.value) for m in tp}
    return None


def _reads_any_ref(spec: NodeSpec) -> bool:
    values = list(spec.inputs.values())
    if isinstance(spec, MapNode):
        values.append(spec.over)
        if spec.node is not None:
            values += list(spec.node.inputs.values())
    return any(isinstance(v, Ref | FirstOf) for v in values)


def _find_cycle(stuck: list[str], compiled: dict[str, CompiledNode]) -> list[str]:
    stuck_set = set(stuck)
    path: list[str] = []
    seen: dict[str, int] = {}
    cur = stuck[0]
    while cur not in seen:
        seen[cur] = len(path)
        path.append(cur)
        nxt = next((d for d in compiled[cur].deps if d in stuck_set), None)
        if nxt is None:
            return path
        cur = nxt
    cycle = path[seen[cur] :]
    cycle.reverse()  # deps point backwards; report in execution order
    start = cycle.index(min(cycle, key=stuck.index))  # begin where the user declared first
    return cycle[start:] + cycle[:start]


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "graph"
