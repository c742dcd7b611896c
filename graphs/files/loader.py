"""Workflow files (YAML or JSON) -> `GraphSpec`, exactly as the Python SDK would build it.

Loading happens in three passes, each with errors that point into the file:

1. **Parse** with positions (`treadle.graphs.files.document`): the line and column of every
   mapping key, value and sequence item.
2. **Check the structure** against the pydantic models of `treadle.graphs.files.schema`; the
   first problem (typos before omissions, then in document order) is reported
   (`treadle.graphs.files.problems`).
3. **Resolve** (here) references (`$node.field`), types, import paths, built-in tools and
   subgraph files into Python objects — each node kind converts its own fields
   (`NodeKind.from_file`), through this module's resolver — and record where every field
   was written (`SourceInfo`), so that the graph validation pass can report `file:line:col`
   too.

Every problem raises `WorkflowFileError`: `FILE:LINE:COL: FIELD: WHAT`.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pydantic import (
    BaseModel,
    Field,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
    create_model,
)

from treadle.graphs.files import schema as ff
from treadle.graphs.files.document import (
    DOCUMENT,
    DocPath,
    Document,
    Format,
    WorkflowFileError,
    describe_value,
    field_text,
    parse,
)
from treadle.graphs.files.problems import validate
from treadle.graphs.files.typeref import (
    BUILTIN_TYPES,
    TypeRefError,
    did_you_mean,
    import_object,
    parse_type,
)
from treadle.graphs.kinds import KINDS
from treadle.graphs.kinds.base import NodeKind
from treadle.graphs.kinds.branch import label_text
from treadle.graphs.kinds.file_fields import NODE_ID_PATTERN, OPTION_FIELDS
from treadle.graphs.spec import (
    ERROR,
    INDEX,
    INPUT,
    ITEM,
    FirstOf,
    GraphSpec,
    InputSpec,
    NodeOptions,
    NodeSpec,
    Pos,
    Ref,
    SourceInfo,
)
from treadle.tools import Tool

__all__ = [
    "WorkflowFileError",
    "load_workflow",
    "load_workflow_text",
    "parse_type",
    "workflow_json_schema",
]

workflow_json_schema = ff.workflow_json_schema

_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*|[0-9]+")
_NODE_ID = re.compile(NODE_ID_PATTERN)
_RESERVED_IDS = {"input", "item", "index", "error"}  # `$input`, `$item`... would be ambiguous
_REF_HINT = (
    "references look like $node, $node.field, $input.name, $item, $index or $error; write $$ "
    "for a literal '$'"
)
_KIND_BY_NAME: dict[str, NodeKind[Any]] = {kind.name: kind for kind in KINDS}


# -- public API ------------------------------------------------------------------------


def load_workflow(path: str | Path) -> GraphSpec:
    """Load a workflow file; `.json` files are JSON, everything else YAML."""
    return _load_file(Path(path), _Context())


def load_workflow_text(
    text: str,
    *,
    filename: str = "<string>",
    base_dir: Path | None = None,
    fmt: Format = "yaml",
) -> GraphSpec:
    """Load a workflow from text. Relative subgraph paths and local modules are looked up
    in `base_dir` (default: the working directory)."""
    if fmt not in ("yaml", "json"):
        raise ValueError(f"fmt must be 'yaml' or 'json', not {fmt!r}")
    return _load_text(text, filename, base_dir or Path.cwd(), fmt, _Context())


# -- resolving ------------------------------------------------------------------------


@dataclass
class _Context:
    """State shared by one load and the subgraph files it pulls in."""

    stack: list[Path] = field(default_factory=list)
    cache: dict[Path, GraphSpec] = field(default_factory=dict)


def _format_of(path: Path, text: str) -> Format:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    return "json" if text.lstrip().startswith("{") else "yaml"


def _load_file(path: Path, ctx: _Context) -> GraphSpec:
    file = str(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise WorkflowFileError(file, 1, 1, DOCUMENT, "file not found") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(file, data, exc) from None
    except OSError as exc:
        raise WorkflowFileError(file, 1, 1, DOCUMENT, f"cannot read: {exc.strerror}") from None
    resolved = path.resolve()
    ctx.stack.append(resolved)
    try:
        spec = _load_text(text, file, path.parent, _format_of(path, text), ctx)
    finally:
        ctx.stack.pop()
    ctx.cache[resolved] = spec
    return spec


def _not_utf8(file: str, data: bytes, exc: UnicodeDecodeError) -> WorkflowFileError:
    """Where the first byte that is not UTF-8 is: line, column (in characters), offset."""
    before = data[: exc.start]
    line = before.count(b"\n") + 1
    col = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", errors="replace")) + 1
    return WorkflowFileError(
        file,
        line,
        col,
        DOCUMENT,
        f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
        "save the file as UTF-8",
    )


def _load_text(text: str, file: str, base_dir: Path, fmt: Format, ctx: _Context) -> GraphSpec:
    doc = parse(text, file, fmt)
    workflow = validate(doc)
    return _Builder(doc, base_dir, ctx).graph(workflow, (), None, {})


class _Builder:
    """Turns a validated file model into a `GraphSpec`, resolving every name."""

    def __init__(self, doc: Document, base_dir: Path, ctx: _Context) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.ctx = ctx
        self.search_dirs = tuple(dict.fromkeys((base_dir, Path.cwd())))
        self.types: Mapping[str, Any] = {}

    def fail(self, path: DocPath, problem: str, *, key: bool = False) -> NoReturn:
        raise self.doc.error(path, problem, key=key)

    # -- graph -------------------------------------------------------------------------

    def graph(
        self,
        wf: ff.Workflow,
        path: DocPath,
        default_name: str | None,
        inherited_types: Mapping[str, Any],
    ) -> GraphSpec:
        outer_types = self.types
        self.types = self.local_types(wf.types, (*path, "types"), inherited_types)
        try:
            inputs = {
                name: self.input_spec(decl, (*path, "inputs", name))
                for name, decl in wf.inputs.items()
            }
            nodes = self.nodes(wf.nodes, (*path, "nodes"))
            outputs = {
                name: self.value(v, (*path, "outputs", name)) for name, v in wf.outputs.items()
            }
        finally:
            self.types = outer_types
        return GraphSpec(
            name=wf.name or default_name or "subgraph",
            inputs=inputs,
            nodes=nodes,
            outputs=outputs,
            models=copy.deepcopy(wf.models),
            description=wf.description,
            source=SourceInfo(self.doc.pos(path), self.field_positions(path)),
        )

    def input_spec(self, decl: str | ff.InputDecl, path: DocPath) -> InputSpec:
        if isinstance(decl, str):
            return InputSpec(type=self.resolve_type(decl, path))
        tp = self.resolve_type(decl.type, (*path, "type"))
        if "default" not in decl.model_fields_set:
            return InputSpec(type=tp)
        self.check_default(tp, decl.default, (*path, "type"), (*path, "default"))
        return InputSpec(type=tp, default=decl.default)

    def nodes(self, models: list[Any], path: DocPath) -> list[NodeSpec]:
        seen: dict[str, int] = {}
        out: list[NodeSpec] = []
        for i, m in enumerate(models):
            where = (*path, i)
            if m.id in seen:
                first = self.doc.pos((*path, seen[m.id], "id"))
                raise self.doc.error(
                    (*where, "id"),
                    f"duplicate node id {m.id!r} (first used at line {first.line})",
                    field=f"{field_text(self.doc.data, path)}[{i}].id",
                )
            if m.id in _RESERVED_IDS:
                self.fail((*where, "id"), f"{m.id!r} is reserved (${m.id} means something else)")
            seen[m.id] = i
            out.append(self.node(m, where, m.id))
        return out

    # -- nodes -------------------------------------------------------------------------

    def node(self, m: Any, path: DocPath, node_id: str) -> NodeSpec:
        """A validated file node as a spec; its kind converts its own fields."""
        kind: NodeKind[Any] = _KIND_BY_NAME[m.kind]
        raw_inputs: dict[str, Any] = getattr(m, "inputs", {})  # a map has none of its own
        inputs = {k: self.value(v, (*path, "inputs", k)) for k, v in raw_inputs.items()}
        source = SourceInfo(self.doc.pos(path), self.field_positions(path))
        given = {f: getattr(m, f) for f in OPTION_FIELDS if f in m.model_fields_set}
        if given.get("handler") is not None:
            given["handler"] = self.nested_node(
                given["handler"], (*path, "handler"), "on_error", source
            )
        options = NodeOptions(**given)
        common = {"id": node_id, "inputs": inputs, "options": options, "source": source}
        return kind.from_file(m, common, self, path)

    def nested_node(
        self, m: Any, path: DocPath, default_id: str, outer: SourceInfo | None
    ) -> NodeSpec:
        inner = self.node(m, path, m.id or default_id)
        field = str(path[-1])
        if inner.source is not None and outer is not None:
            # compile looks the inner node's fields up as "<field>.<name>" (a map's "node.")
            inner.source.fields.update({f"{field}.{k}": p for k, p in inner.source.fields.items()})
            outer.fields.update(
                {
                    f"{field}.{k}": p
                    for k, p in inner.source.fields.items()
                    if not k.startswith(f"{field}.")
                }
            )
        return inner

    def subgraph(self, ref: str | ff.InlineWorkflow, path: DocPath, node_id: str) -> GraphSpec:
        if isinstance(ref, ff.InlineWorkflow):
            return self.graph(ref, path, node_id, self.types)
        target = self.base_dir / ref
        resolved = target.resolve()
        if resolved in self.ctx.stack:
            chain = [p.name for p in self.ctx.stack[self.ctx.stack.index(resolved) :]]
            self.fail(
                path, "subgraph files include each other: " + " -> ".join([*chain, resolved.name])
            )
        if resolved in self.ctx.cache:
            return self.ctx.cache[resolved]
        if not target.is_file():
            self.fail(path, f"subgraph file not found: {target}")
        return _load_file(target, self.ctx)

    # -- values and references ---------------------------------------------------------

    def value(self, v: Any, path: DocPath) -> Any:
        """An input binding: a reference, {first_of: [...]}, or a literal."""
        if isinstance(v, str) and v.startswith("$") and not v.startswith("$$"):
            return self.ref(v, path)
        if isinstance(v, dict) and "first_of" in v:
            if len(v) != 1:
                self.fail(path, "first_of must be the only key of its mapping")
            refs = v["first_of"]
            if not isinstance(refs, list) or not refs:
                self.fail((*path, "first_of"), "first_of takes a non-empty list of references")
            out = []
            for i, r in enumerate(refs):
                if not (isinstance(r, str) and r.startswith("$") and not r.startswith("$$")):
                    self.fail(
                        (*path, "first_of", i),
                        f"expected a reference, got {describe_value(r)} ({_REF_HINT})",
                    )
                out.append(self.ref(r, (*path, "first_of", i)))
            return FirstOf(tuple(out))
        return self.literal(v, path)

    def literal(self, v: Any, path: DocPath) -> Any:
        if isinstance(v, str) and v.startswith("$"):
            if v.startswith("$$"):
                return v[1:]
            self.fail(
                path,
                f"a reference ({v}) must be a whole input value, not inside a list "
                "or mapping; write $$ for a literal '$'",
            )
        if isinstance(v, list):
            return [self.literal(x, (*path, i)) for i, x in enumerate(v)]
        if isinstance(v, dict):
            return {k: self.literal(x, (*path, k)) for k, x in v.items()}
        return v

    def ref(self, text: str, path: DocPath) -> Ref:
        body = text[1:]
        if not body:
            self.fail(path, f"empty reference '$' ({_REF_HINT})")
        parts = body.split(".")
        if "" in parts:
            self.fail(path, f"bad reference {text!r}: empty name between dots ({_REF_HINT})")
        head, rest = parts[0], parts[1:]
        if head == "input":
            node = INPUT
        elif head == "item":
            node = ITEM
        elif head == "index":
            node = INDEX
        elif head == "error":
            node = ERROR
        elif _NODE_ID.match(head):
            node = head
        else:
            self.fail(path, f"bad reference {text!r}: {head!r} is not a node id ({_REF_HINT})")
        for part in rest:
            if not _SEGMENT.fullmatch(part):
                self.fail(path, f"bad reference {text!r}: {part!r} is not a field name")
        return Ref(node, tuple(rest))

    # -- names -------------------------------------------------------------------------

    def resolve_type(self, text: str, path: DocPath) -> Any:
        return self.type_in(text, path, self.types)

    def function(self, spec: str, path: DocPath) -> Any:
        obj = self.import_(spec, path)
        if not callable(obj):
            self.fail(path, f"{spec!r} is a {type(obj).__name__}, not a function")
        return obj

    def tool(self, name: str, path: DocPath) -> Tool:
        if ":" in name:
            obj = self.import_(name, path)
            if not isinstance(obj, Tool):
                self.fail(
                    path, f"{name!r} is a {type(obj).__name__}, not a Tool (make it one with @tool)"
                )
            return obj
        try:
            from treadle.tools.builtins import BUILTINS  # lazy: tools may be optional extras
        except ImportError as exc:
            self.fail(path, f"built-in tool {name!r} is not available ({exc})")
        if name not in BUILTINS:
            known = ", ".join(sorted(BUILTINS)) or "none"
            self.fail(
                path,
                f"unknown built-in tool {name!r}{did_you_mean(name, BUILTINS)}; "
                f"built-in tools: {known} (your own: 'package.module:tool')",
            )
        return BUILTINS[name]

    def import_(self, spec: str, path: DocPath) -> Any:
        try:
            return import_object(spec, search_dirs=self.search_dirs)
        except TypeRefError as exc:
            self.fail(path, str(exc))

    # -- inline types ------------------------------------------------------------------

    def local_types(
        self,
        decls: dict[str, dict[str, str | ff.FieldDecl]],
        path: DocPath,
        inherited: Mapping[str, Any],
    ) -> Mapping[str, Any]:
        for name in decls:
            if name in BUILTIN_TYPES:
                self.fail((*path, name), f"type name {name!r} is a built-in type", key=True)
        types = _LazyTypes(self, decls, path, inherited)
        for name in decls:  # build all now, so an unused type's mistakes are found too
            types[name]
        return types

    def build_type(
        self, name: str, decl: dict[str, str | ff.FieldDecl], path: DocPath, scope: _LazyTypes
    ) -> type[BaseModel]:
        fields: list[tuple[str, Any, str | None, Any]] = []
        for fname, fdecl in decl.items():
            where = (*path, fname)
            if fname.startswith("_"):
                self.fail(where, "field names cannot start with '_'", key=True)
            text = fdecl if isinstance(fdecl, str) else fdecl.type
            tp = self.type_in(text, where if isinstance(fdecl, str) else (*where, "type"), scope)
            if isinstance(fdecl, str) or "default" not in fdecl.model_fields_set:
                fields.append(
                    (fname, tp, None if isinstance(fdecl, str) else fdecl.description, _REQUIRED)
                )
            else:
                self.check_default(tp, fdecl.default, (*where, "type"), (*where, "default"))
                fields.append((fname, tp, fdecl.description, fdecl.default))
        try:
            return _inline_model(name, fields)
        except Exception as exc:
            self.fail(path, f"cannot build type {name!r}: {exc}")

    def type_in(self, text: str, path: DocPath, scope: Mapping[str, Any]) -> Any:
        try:
            return parse_type(text, local_types=scope, search_dirs=self.search_dirs)
        except TypeRefError as exc:
            self.fail(path, str(exc))

    def check_default(self, tp: Any, default: Any, type_path: DocPath, path: DocPath) -> None:
        """A default must be a valid value of its type (checked now, not at the first run)."""
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(tp)
        except PydanticUserError as exc:  # includes "no schema for this type"
            self.fail(type_path, f"pydantic cannot validate this type: {exc.message}")
        try:
            adapter.validate_python(default)
        except ValidationError as exc:
            first = exc.errors()[0]["msg"]
            self.fail(path, f"default {describe_value(default)} does not fit the type: {first}")

    # -- positions ---------------------------------------------------------------------

    def nested_positions(self, path: DocPath, dotted: str) -> dict[str, Pos]:
        """Dotted name -> position of everything below `path`, at any depth."""
        out: dict[str, Pos] = {}
        data = self.doc.at(path)
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in items:
            name = f"{dotted}.{key}"
            out[name] = self.doc.pos((*path, key))
            if isinstance(value, dict | list):
                out.update(self.nested_positions((*path, key), name))
        return out

    def field_positions(self, path: DocPath) -> dict[str, Pos]:
        """Dotted field name -> position, for this mapping and one level below it.

        A node's inner node (`node`) and inline subgraph (`graph`) get their own
        `SourceInfo`; `inputs.<name>.<i>` points at each reference of a first_of.
        """
        data = self.doc.at(path)
        out: dict[str, Pos] = {}
        for key, value in data.items():
            name = str(key)
            out[name] = self.doc.pos((*path, key))
            if name in ("node", "graph", "fallback"):
                continue
            if name == "models" and isinstance(value, dict):
                # backend entries are checked by the runtime: every field of them, at depth
                out.update(self.nested_positions((*path, key), name))
                continue
            if isinstance(value, dict):
                for sub, subval in value.items():
                    label = label_text(sub) if name == "routes" else sub
                    out[f"{name}.{label}"] = self.doc.pos((*path, key, sub))
                    if isinstance(subval, dict) and isinstance(subval.get("first_of"), list):
                        for i in range(len(subval["first_of"])):
                            out[f"{name}.{label}.{i}"] = self.doc.pos(
                                (*path, key, sub, "first_of", i)
                            )
            elif isinstance(value, list) and name != "nodes":
                for i in range(len(value)):
                    out[f"{name}.{i}"] = self.doc.pos((*path, key, i))
        return out


_REQUIRED: Any = object()


class _LazyTypes(Mapping[str, Any]):
    """A workflow's `types:`, built on first use so they may refer to each other."""

    def __init__(
        self,
        builder: _Builder,
        decls: dict[str, dict[str, str | ff.FieldDecl]],
        path: DocPath,
        inherited: Mapping[str, Any],
    ) -> None:
        self.builder = builder
        self.decls = decls
        self.path = path
        self.inherited = inherited
        self.built: dict[str, Any] = {}
        self.building: list[str] = []

    def __getitem__(self, name: str) -> Any:
        if name in self.built:
            return self.built[name]
        if name not in self.decls:
            return self.inherited[name]
        if name in self.building:
            chain = " -> ".join([*self.building[self.building.index(name) :], name])
            self.builder.fail(
                (*self.path, name),
                f"recursive inline types are not supported ({chain}); define the model in "
                "Python and refer to it as 'package.module:Model'",
                key=True,
            )
        self.building.append(name)
        try:
            model = self.builder.build_type(name, self.decls[name], (*self.path, name), self)
        finally:
            self.building.pop()
        self.built[name] = model
        return model

    def __iter__(self) -> Iterator[str]:
        yield from self.decls
        yield from (n for n in self.inherited if n not in self.decls)

    def __len__(self) -> int:
        return len(set(self.decls) | set(self.inherited))

    def __contains__(self, name: object) -> bool:
        return name in self.decls or name in self.inherited


# Two declarations with the same name and fields give the same class, so a graph loaded
# twice (or from YAML and from JSON) compares equal, and two references share one class.
_MODEL_CACHE: dict[Any, type[BaseModel]] = {}


def _inline_model(name: str, fields: list[tuple[str, Any, str | None, Any]]) -> type[BaseModel]:
    key: Any = (
        name,
        tuple(
            (
                f,
                tp,
                desc,
                "required" if d is _REQUIRED else json.dumps(d, sort_keys=True, default=repr),
            )
            for f, tp, desc, d in fields
        ),
    )
    try:
        cached = _MODEL_CACHE.get(key)
    except TypeError:  # an unhashable type inside: build without caching
        key, cached = None, None
    if cached is not None:
        return cached
    definitions: dict[str, Any] = {
        f: (tp, Field(... if d is _REQUIRED else copy.deepcopy(d), description=desc))
        for f, tp, desc, d in fields
    }
    with warnings.catch_warnings():
        # e.g. a field that shadows a BaseModel attribute: refuse rather than misbehave
        warnings.simplefilter("error", UserWarning)
        model: type[BaseModel] = create_model(name, **definitions)
    if key is not None:
        _MODEL_CACHE[key] = model
    return model
