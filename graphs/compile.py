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
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    PydanticSchemaGenerationError,
    TypeAdapter,
    ValidationError,
    create_model,
)

from treadle.errors import GraphError
from treadle.graphs.analysis import analyze
from treadle.graphs.compiled import CompiledGraph, CompiledNode, Param
from treadle.graphs.kinds import kind_of
from treadle.graphs.spec import (
    ERROR,
    INDEX,
    INPUT,
    ITEM,
    ErrorInfo,
    FirstOf,
    GraphSpec,
    NodeSpec,
    Pos,
    Ref,
)
from treadle.graphs.typecheck import describe, field_type, is_compatible, type_hints

__all__ = [
    "DEFAULT_MODEL",
    "CompiledGraph",
    "CompiledNode",
    "GraphIssue",
    "GraphValidationError",
    "Param",
    "compile_graph",
]

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


#: the problems of one `models:` entry, as (field inside the entry, what is wrong): the
#: backends' `model_entry_problems`, handed in by the runtime (graphs know no backend)
ModelCheck = Callable[[Any], list[tuple[str, str]]]


def compile_graph(
    spec: GraphSpec,
    *,
    models: Iterable[str] | None = None,
    check_model: ModelCheck | None = None,
) -> CompiledGraph:
    """Validate `spec` and precompute its execution plan and static facts.

    `models` are the aliases the runtime will provide besides those the graph declares;
    "default" is always known. `check_model` checks each entry the graph (or a subgraph)
    declares under `models:`.
    """
    known = {DEFAULT_MODEL, *spec.models, *(models or ())}
    return _Compiler(spec, frozenset(known), check_model).run()


class _Compiler:
    """Implements `treadle.graphs.kinds.base.Checks`: the kinds check their own nodes
    through it."""

    def __init__(
        self, spec: GraphSpec, known_models: frozenset[str], check_model: ModelCheck | None
    ):
        self.spec = spec
        self.known_models = known_models
        self.check_model = check_model
        self.issues: list[GraphIssue] = []
        self.out_types: dict[str, Any] = {}
        self.by_id: dict[str, NodeSpec] = {}
        #: > 0 while an `on_error` handler is checked (`$error` is defined there)
        self._in_handler = 0

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
        by_id = self.by_id
        for node in spec.nodes:
            if not node.id or node.id.startswith("$") or any(c in node.id for c in ".[]$ "):
                self.issue("node ids must be non-empty and free of '.', '[', ']', '$', ' '", node)
            if node.id in by_id:
                self.issue("duplicate node id", node, "id")
            by_id[node.id] = node

        if not spec.nodes:
            self.issue("a graph needs at least one node", field="nodes")
        if self.check_model is not None:
            for alias, entry in spec.models.items():
                for field, problem in self.check_model(entry):
                    self.issue(problem, field=".".join(p for p in ("models", alias, field) if p))
        compiled: dict[str, CompiledNode] = {}
        for node in spec.nodes:
            compiled[node.id] = self.describe(node, item_type=None)
            self.out_types[node.id] = compiled[node.id].output_type

        for node in spec.nodes:
            self.check_node(node, compiled[node.id], item_type=None)

        guards = self.check_control(by_id)
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
        prompted = (kind_of(n.spec).prompted(n.spec) for n in _with_nested(ordered.values()))
        return CompiledGraph(
            spec=spec,
            nodes=ordered,
            order=tuple(order),
            input_model=input_model,
            output_type=output_type,
            facts=analyze(ordered),
            # LLM and planner nodes, those a map, a race or an error handler runs included
            models=frozenset(p.model for p in prompted if p is not None),
        )

    # -- per node ----------------------------------------------------------------------

    def describe(self, node: NodeSpec, item_type: Any) -> CompiledNode:
        """Parameters and output type of a node (before its bindings are checked)."""
        try:
            kind = kind_of(node)
        except TypeError:
            self.issue(f"unknown node kind {type(node).__name__}", node)
            return CompiledNode(node.id, node, {}, Any)
        return kind.describe(node, self, item_type)

    def compile_child(self, node: NodeSpec, graph: GraphSpec) -> CompiledGraph | None:
        try:
            return compile_graph(graph, models=self.known_models, check_model=self.check_model)
        except GraphValidationError as exc:
            for sub in exc.issues:
                self.issues.append(
                    GraphIssue(
                        f"in subgraph {graph.name!r}: {sub.message}",
                        f"{node.id}/{sub.node}" if sub.node else node.id,
                        sub.field,
                        sub.pos or (node.source.at("graph") if node.source else None),
                    )
                )
            return None

    def signature(self, node: NodeSpec, fn: Any, field: str) -> tuple[dict[str, Param], Any, bool]:
        if not callable(fn):
            self.issue(f"{fn!r} is not callable", node, field)
            return {}, Any, True
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return {}, Any, True
        hints = type_hints(fn)
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
        self, node: NodeSpec, cn: CompiledNode, item_type: Any, prefix: str = ""
    ) -> list[str]:
        """Check options, bindings and the kind's own rules; return the node ids this node
        reads from."""
        deps: list[str] = []
        for option, problem in node.options.problems():
            self.issue(problem, node, prefix + option)
        try:
            kind = kind_of(node)
        except TypeError:
            return deps  # reported by `describe`
        kind.check(node, cn, self, item_type, prefix, deps)
        if kind.has_inputs:
            self.check_inputs(node, cn, item_type, prefix, deps)
        if node.options.on_error == "fallback":
            self.check_fallback(node, cn, prefix)
        self.check_cache(node, cn, prefix)
        if isinstance(node.options.handler, NodeSpec):
            deps += self.check_handler(node, node.options.handler, cn, item_type, prefix)
        cn.deps = tuple(dict.fromkeys(deps))
        return deps

    def check_handler(
        self, node: NodeSpec, handler: NodeSpec, cn: CompiledNode, item_type: Any, prefix: str
    ) -> list[str]:
        """An `on_error` handler: checked like a nested node that may read `$error`, whose
        output must fit the failed node's."""
        if not handler.id:
            handler.id = "on_error"
        hcn = self.describe(handler, item_type)
        self._in_handler += 1
        try:
            deps = self.check_node(handler, hcn, item_type, prefix=prefix + "handler.")
        finally:
            self._in_handler -= 1
        if not is_compatible(hcn.output_type, cn.output_type):
            self.issue(
                f"the handler's output ({describe(hcn.output_type)}) does not fit the "
                f"node's ({describe(cn.output_type)})",
                node,
                prefix + "handler",
            )
        cn.handler = hcn
        return deps

    def check_cache(self, node: NodeSpec, cn: CompiledNode, prefix: str) -> None:
        try:
            options = node.options.cache_options
        except ValueError:
            return  # reported with the other option problems
        if options is None or options.key is None:
            return
        for name in options.key:
            if name not in node.inputs:
                bound = ", ".join(node.inputs) or "none"
                self.issue(
                    f"cache key {name!r} is not one of the node's inputs ({bound})",
                    node,
                    prefix + "cache",
                )

    def check_fallback(self, node: NodeSpec, cn: CompiledNode, prefix: str) -> None:
        """The fallback must be a value of the node's output type; it is kept converted (a
        mapping written for a model output becomes the model), as the node's output is."""
        fallback = node.options.fallback
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(cn.output_type)
        except PydanticSchemaGenerationError:
            cn.fallback = fallback  # a type pydantic cannot check: taken as given
            return
        try:
            cn.fallback = adapter.validate_python(fallback)
        except ValidationError as exc:
            why = "; ".join(e["msg"] for e in exc.errors()[:3])
            self.issue(
                f"fallback {fallback!r} is not a {describe(cn.output_type)} (the node's output "
                f"type): {why}",
                node,
                prefix + "fallback",
            )

    def check_inputs(
        self, node: NodeSpec, cn: CompiledNode, item_type: Any, prefix: str, deps: list[str]
    ) -> None:
        for name, binding in node.inputs.items():
            where = f"{prefix}inputs.{name}"
            param = cn.params.get(name)
            if param is None and not cn.accepts_extra:
                self.issue(kind_of(node).unused_input(node, name, cn.params), node, where)
            src = self.binding_type(binding, node, where, item_type, deps)
            if param is not None and src is not None and not is_compatible(src, param.type):
                given = (
                    f"{_source_of(binding)} is {describe(src)}"
                    if isinstance(binding, Ref | FirstOf)
                    else f"the value {binding!r}"
                )
                self.issue(
                    f"type mismatch: {given}, bound to an input of type {describe(param.type)}",
                    node,
                    where,
                )
        for name, param in cn.params.items():
            if param.required and name not in node.inputs:
                self.issue(f"input {name!r} is not bound", node, f"{prefix}inputs")

    def binding_type(
        self, binding: Any, node: NodeSpec, where: str, item_type: Any, deps: list[str]
    ) -> Any:
        """The type a binding delivers (`None` when unknown because of an issue)."""
        if isinstance(binding, FirstOf):
            if not binding.refs:
                self.issue("first_of needs at least one reference", node, where)
                return None
            types_ = [self.ref_type(r, node, where, item_type, deps) for r in binding.refs]
            if any(t is None for t in types_):
                return None
            return types_[0] if len(set(map(repr, types_))) == 1 else Union[tuple(types_)]  # noqa: UP007
        if isinstance(binding, Ref):
            return self.ref_type(binding, node, where, item_type, deps)
        if isinstance(binding, str | int | bool) and not isinstance(binding, enum.Enum):
            return Literal[binding]  # a literal fits a Literal input that lists its value
        return type(binding) if binding is not None else Any

    def ref_type(
        self, ref: Ref, node: NodeSpec, where: str, item_type: Any, deps: list[str]
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
        elif ref.node == INDEX:
            if item_type is None:
                self.issue("$index is only defined inside a map", node, where)
                return None
            tp = int
        elif ref.node == ERROR:
            if not self._in_handler:
                self.issue("$error is only defined inside an on_error handler", node, where)
                return None
            tp = ErrorInfo
        else:
            if ref.node not in self.by_id:
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

    def static_type(self, binding: Any) -> Any:
        """What a binding delivers as far as it is known (None: not known), quietly."""
        if not isinstance(binding, Ref):
            return None
        if binding.node == INPUT:
            decl = self.spec.inputs.get(binding.path[0]) if binding.path else None
            return decl.type if decl and len(binding.path) == 1 else None
        tp = self.out_types.get(binding.node)
        for part in binding.path:
            tp = field_type(tp, part) if tp is not None else None
        return tp

    # -- graph-wide --------------------------------------------------------------------

    def check_control(self, by_id: dict[str, NodeSpec]) -> dict[str, dict[str, set[str]]]:
        """The kinds' graph-wide checks; return for each node that runs only on a chosen
        label {choosing node id: allowed labels}."""
        guards: dict[str, dict[str, set[str]]] = {}
        for node in self.spec.nodes:
            try:
                kind = kind_of(node)
            except TypeError:
                continue
            kind.check_graph(node, self, by_id)
            for label, target in kind.control_edges(node):
                if target in by_id and target != node.id:
                    guards.setdefault(target, {}).setdefault(node.id, set()).add(label)
        return guards

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
        fields: dict[str, Any] = {}
        holder = NodeSpec(id="", source=self.spec.source)
        for name, binding in self.spec.outputs.items():
            tp = self.binding_type(binding, holder, f"outputs.{name}", None, [])
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


def _with_nested(nodes: Iterable[CompiledNode]) -> list[CompiledNode]:
    """`nodes` and every node they run themselves (a map's inner node, a race's branches,
    error handlers), recursively."""
    out: list[CompiledNode] = []
    todo = list(nodes)
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(node.nested_nodes())
    return out


def _reads_any_ref(spec: NodeSpec) -> bool:
    try:
        bindings = kind_of(spec).bindings(spec)
    except TypeError:
        bindings = iter(spec.inputs.items())
    return any(isinstance(v, Ref | FirstOf) for _, v in bindings)


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


def _source_of(binding: Ref | FirstOf) -> str:
    """Where a bound value comes from, for a message: the producing node and the reference."""
    if isinstance(binding, FirstOf):
        return "first_of(" + ", ".join(_source_of(r) for r in binding.refs) + ")"
    if binding.node == INPUT:
        return f"graph input {'.'.join(binding.path)!r}"
    if binding.node == ITEM:
        return f"the map's item ({binding})"
    return f"the output of node {binding.node!r} ({binding})"
