"""Workflow files (YAML or JSON) -> `GraphSpec`, exactly as the Python SDK would build it.

Loading happens in three passes, each with errors that point into the file:

1. **Parse** with ruamel.yaml's round-trip loader, which remembers the line and column of
   every mapping key, value and sequence item. JSON is parsed with `json` (the authority on
   what JSON means) and then again with ruamel, only for the positions.
2. **Check the structure** against the pydantic models of `treadle.graphs.files.schema`; the
   first problem (typos before omissions, then in document order) is reported.
3. **Resolve** references (`$node.field`), types, import paths, built-in tools and
   subgraph files into Python objects, and record where every field was written
   (`SourceInfo`), so that the graph validation pass can report `file:line:col` too.

Every problem raises `WorkflowFileError`: `FILE:LINE:COL: FIELD: WHAT`.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NoReturn

from pydantic import (
    BaseModel,
    Field,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
    create_model,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean

from treadle.errors import GraphError
from treadle.graphs.files import schema as ff
from treadle.graphs.files.typeref import (
    BUILTIN_TYPES,
    TypeRefError,
    did_you_mean,
    import_object,
    parse_type,
)
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
    Pos,
    Ref,
    SourceInfo,
    SubgraphNode,
    ToolNode,
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

Format = Literal["yaml", "json"]
DocPath = tuple[str | int, ...]

#: the field path used for problems that belong to the whole document
DOCUMENT = "(document)"

_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*|[0-9]+")
_NODE_ID = re.compile(ff.NODE_ID_PATTERN)
_RESERVED_IDS = {"input", "item"}  # `$input` and `$item` would be ambiguous
_REF_HINT = (
    "references look like $node, $node.field, $input.name or $item; write $$ for a literal '$'"
)
_STD_STR_TAG = "tag:yaml.org,2002:str"


class WorkflowFileError(GraphError, ValueError):
    """A problem in a workflow file, with where it is: `FILE:LINE:COL: FIELD: WHAT`."""

    def __init__(self, file: str, line: int, col: int, field: str, problem: str) -> None:
        super().__init__(f"{file}:{line}:{col}: {field}: {problem}")
        self.file = file
        self.line = line
        self.col = col
        self.field = field
        self.problem = problem

    @property
    def pos(self) -> Pos:
        return Pos(self.file, self.line, self.col)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.file, self.line, self.col, self.field, self.problem))


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


# -- pass 1: parsing with positions ----------------------------------------------------


@dataclass
class _Doc:
    """Plain data (dicts, lists, scalars) plus where each part was written."""

    file: str
    data: Any
    values: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    #: problems found while converting; raised once the data is complete, so that the
    #: field path can name nodes by their ids
    refused: list[tuple[DocPath, str]] = field(default_factory=list)

    def refuse(self, path: DocPath, problem: str) -> None:
        self.refused.append((path, problem))

    def pos(self, path: DocPath, *, key: bool = False) -> Pos:
        """Position of the value at `path` (or of its key), else of the nearest parent."""
        if key and path in self.keys:
            return self._pos(self.keys[path])
        while True:
            if path in self.values:
                return self._pos(self.values[path])
            if not path:
                return Pos(self.file, 1, 1)
            path = path[:-1]

    def _pos(self, at: tuple[int, int]) -> Pos:
        return Pos(self.file, at[0] + 1, at[1] + 1)

    def at(self, path: DocPath) -> Any:
        cur = self.data
        for part in path:
            cur = cur[part]
        return cur

    def error(
        self, path: DocPath, problem: str, *, key: bool = False, field: str | None = None
    ) -> WorkflowFileError:
        pos = self.pos(path, key=key)
        return WorkflowFileError(
            self.file, pos.line, pos.col, field or _field_text(self.data, path), problem
        )


def _parse(text: str, file: str, fmt: Format) -> _Doc:
    if fmt == "json":
        return _parse_json(text, file)
    root = _load_yaml(text, file)
    doc = _Doc(file, None)
    doc.data = _plain(root, (), doc, set(), strict=True)
    if doc.refused:
        raise doc.error(*doc.refused[0])
    return doc


def _load_yaml(text: str, file: str) -> Any:
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text)
    except DuplicateKeyError:
        raise _duplicate_key_error(text, file) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise WorkflowFileError(file, line, col, DOCUMENT, f"YAML syntax error: {what}") from None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise WorkflowFileError(file, line, col, DOCUMENT, f"cannot parse YAML: {exc}") from None


def _parse_json(text: str, file: str) -> _Doc:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                duplicates.append(k)
            out[k] = v
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(
            file, exc.lineno, exc.colno, DOCUMENT, f"JSON syntax error: {exc.msg}"
        ) from None
    doc = _Doc(file, data)
    # JSON is YAML 1.2, so ruamel can tell where things are; `json` decided what they mean
    # (ruamel, for one, does not join surrogate-pair escapes).
    try:
        root = YAML(typ="rt").load(text)
    except DuplicateKeyError:
        raise _duplicate_key_error(text, file) from None
    except YAMLError:
        root = None  # positions degrade to 1:1; the content is still right
    if root is not None:
        _plain(root, (), doc, set(), strict=False)
    if duplicates:
        raise doc.error((), f"duplicate key {duplicates[0]!r}", field=DOCUMENT)
    return doc


def _duplicate_key_error(text: str, file: str) -> WorkflowFileError:
    """Find the first duplicate key in document order and say where both are."""
    yaml = YAML(typ="rt")
    try:
        tree = yaml.compose(text)
    except YAMLError:  # pragma: no cover - construction got further than composing
        tree = None
    found = _find_duplicate(tree, ()) if tree is not None else None
    if found is None:  # pragma: no cover - ruamel found one, so we do too
        return WorkflowFileError(file, 1, 1, DOCUMENT, "duplicate mapping key")
    path, key, first, second = found
    try:  # the data (last value wins) only serves to name nodes by id in the field path
        lenient = YAML(typ="rt")
        lenient.allow_duplicate_keys = True
        data = _plain(lenient.load(text), (), _Doc(file, None), set(), strict=False)
    except YAMLError:  # pragma: no cover - it parsed up to the duplicate a moment ago
        data = None
    field = _field_text(data, (*path, key))
    return WorkflowFileError(
        file,
        second.start_mark.line + 1,
        second.start_mark.column + 1,
        field,
        f"duplicate key {key!r} (first written at line {first.start_mark.line + 1})",
    )


def _find_duplicate(
    node: Node, path: DocPath
) -> tuple[DocPath, str, ScalarNode, ScalarNode] | None:
    if isinstance(node, MappingNode):
        seen: dict[str, ScalarNode] = {}
        for k, v in node.value:
            if isinstance(k, ScalarNode):
                if k.value in seen:
                    return path, k.value, seen[k.value], k
                seen[k.value] = k
            inner = _find_duplicate(v, (*path, k.value if isinstance(k, ScalarNode) else "?"))
            if inner is not None:
                return inner
    elif isinstance(node, SequenceNode):
        for i, v in enumerate(node.value):
            inner = _find_duplicate(v, (*path, i))
            if inner is not None:
                return inner
    return None


def _plain(node: Any, path: DocPath, doc: _Doc, active: set[int], *, strict: bool) -> Any:
    """ruamel's round-trip objects -> plain Python data, recording positions in `doc`.

    `strict` rejects what a workflow file must not contain (custom tags, sets); it is off
    for the positions-only pass over JSON, whose content came from `json`.
    """
    if not path:
        lc = getattr(node, "lc", None)
        if lc is not None and lc.line is not None:
            doc.values[()] = (lc.line, lc.col)
    if isinstance(node, CommentedBase) and strict:
        tag = getattr(getattr(node, "tag", None), "value", None)
        if tag is not None and not isinstance(node, TaggedScalar):
            return doc.refuse(path, f"YAML tags are not supported here ({tag})")
    if isinstance(node, CommentedMap | CommentedSeq):
        if id(node) in active:  # a list holding itself (ruamel 0.18+ nulls a mapping's)
            return doc.refuse(path, "a YAML alias refers to a mapping or list that contains it")
        active.add(id(node))
        try:
            return _plain_container(node, path, doc, active, strict=strict)
        finally:
            active.discard(id(node))
    if isinstance(node, TaggedScalar):
        if node.tag.value == _STD_STR_TAG:
            return str(node.value)
        return doc.refuse(path, f"YAML tags are not supported here ({node.tag.value})")
    if isinstance(node, ScalarBoolean):
        return bool(node)
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return _join_surrogates(str(node))
    if isinstance(node, datetime.datetime):
        return datetime.datetime(
            node.year,
            node.month,
            node.day,
            node.hour,
            node.minute,
            node.second,
            node.microsecond,
            node.tzinfo,
        )
    if isinstance(node, datetime.date | bytes):
        return node
    if strict:
        return doc.refuse(path, f"unsupported YAML value of type {type(node).__name__}")
    return node


def _plain_container(
    node: CommentedMap | CommentedSeq, path: DocPath, doc: _Doc, active: set[int], *, strict: bool
) -> Any:
    if isinstance(node, CommentedMap):
        out: dict[Any, Any] = {}
        for k, v in node.items():
            key = _plain(k, (*path, "[key]"), doc, active, strict=strict)
            if isinstance(key, list | dict):
                doc.refuse(path, "mapping keys must be plain values")
                continue
            sub = (*path, key)
            entry = node.lc.data.get(k)
            if entry is not None:  # merged (`<<`) keys have no position of their own
                doc.keys[sub] = (entry[0], entry[1])
                doc.values[sub] = (entry[2], entry[3])
            out[key] = _plain(v, sub, doc, active, strict=strict)
        return out
    items: list[Any] = []
    for i, v in enumerate(node):
        sub = (*path, i)
        entry = node.lc.data.get(i)
        if entry is not None:
            doc.values[sub] = (entry[0], entry[1])
        items.append(_plain(v, sub, doc, active, strict=strict))
    return items


def _join_surrogates(text: str) -> str:
    """Turn escaped UTF-16 surrogate pairs ("\\ud83d\\ude00") into the character they mean."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        return text  # a lone surrogate stays as written, as `json` does


def _field_text(data: Any, path: DocPath) -> str:
    """`nodes[plan].inputs.question`: list items of `nodes` are named by their id."""
    out = ""
    cur = data
    prev: str | int | None = None
    for part in path:
        if isinstance(part, int):
            label = str(part)
            if isinstance(cur, list) and 0 <= part < len(cur):
                item = cur[part]
                node_id = item.get("id") if isinstance(item, dict) else None
                if prev == "nodes" and isinstance(node_id, str) and _NODE_ID.match(node_id):
                    label = node_id
                cur = item
            else:
                cur = None
            out += f"[{label}]"
        else:
            out += f".{part}" if out else str(part)
            cur = cur.get(part) if isinstance(cur, dict) else None
        prev = part
    return out or DOCUMENT


# -- pass 2: structure -----------------------------------------------------------------


def _validate(doc: _Doc) -> ff.Workflow:
    if not isinstance(doc.data, dict):
        got = "an empty document" if doc.data is None else _describe_value(doc.data)
        raise doc.error((), f"the top level must be a mapping (name:, nodes:, ...), got {got}")
    try:
        return ff.Workflow.model_validate(doc.data)
    except ValidationError as exc:
        problems = [_problem(doc, err) for err in exc.errors()]
        # a typo (unknown field) explains a "missing" one better than the other way round
        problems.sort(key=lambda p: (p.missing, p.error.line, p.error.col))
        raise problems[0].error from None


@dataclass
class _Problem:
    error: WorkflowFileError
    missing: bool


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def _problem(doc: _Doc, err: Any) -> _Problem:
    loc: tuple[Any, ...] = tuple(err["loc"])
    path, found, on_key = _locate(doc.data, loc)
    kind = err["type"]
    value = doc.at(path) if found else None
    if on_key and path:  # the problem is the key itself (a name that breaks a pattern)
        value = path[-1]
    if kind == "missing":
        return _Problem(doc.error(path, "required field is missing"), missing=True)
    if kind == "extra_forbidden":
        name = str(path[-1])
        allowed = _allowed_fields(doc.data, path[:-1])
        hint = did_you_mean(name, allowed)
        if not hint and allowed:
            hint = "; allowed here: " + ", ".join(allowed)
        return _Problem(doc.error(path, f"unknown field {name!r}{hint}", key=True), False)
    if kind == "node_kind":
        return _Problem(_kind_error(doc, path, value), False)
    if kind in ("input_decl", "field_decl", "graph_ref"):
        return _Problem(doc.error(path, f"{err['msg']}, got {_describe_value(value)}"), False)
    if kind == "string_pattern_mismatch":
        meaning = ff.PATTERN_MEANING.get(err.get("ctx", {}).get("pattern", ""), "valid here")
        what = f"{value!r} is not {meaning}"
        return _Problem(doc.error(path, what, key=on_key), False)
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        what = f"expected one of {expected}, got {_describe_value(value)}"
        return _Problem(doc.error(path, what), False)
    if kind in _EXPECTED:
        what = f"expected {_EXPECTED[kind]}, got {_describe_value(value)}"
        return _Problem(doc.error(path, what, key=on_key), False)
    if kind == "too_short" and isinstance(value, str | dict | list):
        return _Problem(doc.error(path, "must not be empty"), False)
    msg = str(err["msg"])
    msg = msg.replace("Input should be", "must be").replace("String should", "must")
    if found and not isinstance(value, dict | list):
        msg += f", got {_describe_value(value)}"
    return _Problem(doc.error(path, msg, key=on_key), False)


def _locate(data: Any, loc: tuple[Any, ...]) -> tuple[DocPath, bool, bool]:
    """Map a pydantic error location onto the document: (path, value exists, key error)."""
    path: list[str | int] = []
    cur = data
    on_key = False
    for part in loc:
        if part == "[key]":
            on_key = True
            continue
        if isinstance(part, str) and part in ff.UNION_TAGS:
            continue
        if isinstance(cur, dict):
            key = _find_key(cur, part)
            if key is not _NO_KEY:
                path.append(key)
                cur = cur[key]
                continue
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            path.append(part)
            cur = cur[part]
            continue
        # not in the document: a missing field (the last part) or a path below it
        path.append(part)
        return tuple(path), False, on_key
    return tuple(path), True, on_key


_NO_KEY: Any = object()


def _find_key(mapping: dict[Any, Any], part: Any) -> Any:
    if part in mapping:
        return part
    for k in mapping:  # route labels: YAML `true:` was validated as "true"
        if ff.label_text(k) == part:
            return k
    return _NO_KEY


def _kind_error(doc: _Doc, path: DocPath, value: Any) -> WorkflowFileError:
    kinds = ", ".join(ff.FILE_KINDS)
    if not isinstance(value, dict):
        return doc.error(
            path, f"a node must be a mapping with `kind` ({kinds}), got {_describe_value(value)}"
        )
    if "kind" not in value:
        return doc.error((*path, "kind"), f"required field is missing (one of {kinds})")
    kind = value["kind"]
    if not isinstance(kind, str):
        return doc.error((*path, "kind"), f"expected one of {kinds}, got {_describe_value(kind)}")
    return doc.error(
        (*path, "kind"),
        f"unknown kind {kind!r}{did_you_mean(kind, ff.FILE_KINDS)}; expected one of {kinds}",
    )


def _allowed_fields(data: Any, path: DocPath) -> list[str]:
    """Field names of the file-format model that describes the mapping at `path`."""
    model = _model_at(ff.Workflow, data, path)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(tp: Any, data: Any, path: DocPath) -> type[BaseModel] | None:
    cur = data
    for part in path:
        tp = _concrete(tp, cur)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            if part not in fields:
                return None
            info = fields[part]
            tp = (
                typing.Annotated[(info.annotation, *info.metadata)]
                if info.metadata
                else info.annotation
            )
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            cur = None
    tp = _concrete(tp, cur)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _concrete(tp: Any, value: Any) -> Any:
    """Strip `Annotated` and pick the union member that `value` selects."""
    for _ in range(16):
        if typing.get_origin(tp) is typing.Annotated:
            base, *meta = typing.get_args(tp)
            disc = next((m for m in meta if hasattr(m, "discriminator")), None)
            if disc is not None and callable(disc.discriminator):
                tag = disc.discriminator(value)
                members = typing.get_args(base)
                chosen = [
                    m
                    for m in members
                    if any(getattr(x, "tag", None) == tag for x in typing.get_args(m)[1:])
                ]
                if not chosen:
                    return None
                tp = chosen[0]
            else:
                tp = base
            continue
        args = typing.get_args(tp)
        if args and type(None) in args and typing.get_origin(tp) in (typing.Union, UnionType):
            rest = [a for a in args if a is not type(None)]
            tp = rest[0]
            continue
        return tp
    return tp  # pragma: no cover - nesting this deep does not occur in the file format


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- pass 3: resolving -----------------------------------------------------------------


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowFileError(file, 1, 1, DOCUMENT, "file not found") from None
    except UnicodeDecodeError as exc:
        raise WorkflowFileError(file, 1, 1, DOCUMENT, f"not UTF-8 text: {exc.reason}") from None
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


def _load_text(text: str, file: str, base_dir: Path, fmt: Format, ctx: _Context) -> GraphSpec:
    doc = _parse(text, file, fmt)
    workflow = _validate(doc)
    return _Builder(doc, base_dir, ctx).graph(workflow, (), None, {})


class _Builder:
    """Turns a validated file model into a `GraphSpec`, resolving every name."""

    def __init__(self, doc: _Doc, base_dir: Path, ctx: _Context) -> None:
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

    def nodes(self, models: list[ff.AnyNode], path: DocPath) -> list[NodeSpec]:
        seen: dict[str, int] = {}
        out: list[NodeSpec] = []
        for i, m in enumerate(models):
            where = (*path, i)
            if m.id in seen:
                first = self.doc.pos((*path, seen[m.id], "id"))
                raise self.doc.error(
                    (*where, "id"),
                    f"duplicate node id {m.id!r} (first used at line {first.line})",
                    field=f"{_field_text(self.doc.data, path)}[{i}].id",
                )
            if m.id in _RESERVED_IDS:
                self.fail((*where, "id"), f"{m.id!r} is reserved (${m.id} means something else)")
            seen[m.id] = i
            out.append(self.node(m, where, m.id))
        return out

    # -- nodes -------------------------------------------------------------------------

    def node(self, m: ff.AnyNode | ff.AnyInnerNode, path: DocPath, node_id: str) -> NodeSpec:
        raw_inputs: dict[str, Any] = getattr(m, "inputs", {})  # a map has none of its own
        inputs = {k: self.value(v, (*path, "inputs", k)) for k, v in raw_inputs.items()}
        policy = Policy(**{f: getattr(m, f) for f in ff.POLICY_FIELDS if f in m.model_fields_set})
        fields = self.field_positions(path)
        common: dict[str, Any] = {"id": node_id, "inputs": inputs, "policy": policy}
        source = SourceInfo(self.doc.pos(path), fields)
        if isinstance(m, ff.FuncNode | ff.InnerFuncNode):
            fn = self.function(m.fn, (*path, "fn"))
            return FuncNode(**common, source=source, fn=fn, blocking=m.blocking)
        if isinstance(m, ff.ToolNode | ff.InnerToolNode):
            return ToolNode(**common, source=source, tool=self.tool(m.tool, (*path, "tool")))
        if isinstance(m, ff.LLMNode | ff.InnerLLMNode):
            return LLMNode(
                **common,
                source=source,
                prompt=m.prompt,
                model=m.model,
                system=m.system,
                output=self.resolve_type(m.output, (*path, "output")),
                tools=tuple(self.tool(t, (*path, "tools", i)) for i, t in enumerate(m.tools)),
                max_turns=m.max_turns,
                temperature=m.temperature,
                max_tokens=m.max_tokens,
            )
        if isinstance(m, ff.PlannerNode | ff.InnerPlannerNode):
            return PlannerNode(
                **common,
                source=source,
                prompt=m.prompt,
                model=m.model,
                system=m.system,
                tools=tuple(self.tool(t, (*path, "tools", i)) for i, t in enumerate(m.tools)),
                output=self.resolve_type(m.output, (*path, "output")),
                max_replans=m.max_replans,
                joiner=m.joiner,
            )
        if isinstance(m, ff.MapNode | ff.InnerMapNode):
            over = self.value(m.over, (*path, "over"))
            inner = self.node(m.node, (*path, "node"), m.node.id or node_id)
            if inner.source is not None:
                # compile.py looks the inner node's fields up as "node.<field>"
                inner.source.fields.update({f"node.{k}": p for k, p in inner.source.fields.items()})
                fields.update(
                    {
                        f"node.{k}": p
                        for k, p in inner.source.fields.items()
                        if not k.startswith("node.")
                    }
                )
            reduce_fn = self.function(m.reduce, (*path, "reduce")) if m.reduce else None
            return MapNode(**common, source=source, over=over, node=inner, reduce=reduce_fn)
        if isinstance(m, ff.BranchNode | ff.InnerBranchNode):
            routes = {label: tuple(ids) for label, ids in m.routes.items()}
            route_fn = self.function(m.route, (*path, "route")) if m.route else None
            return BranchNode(
                **common, source=source, routes=routes, route=route_fn, default=m.default
            )
        if isinstance(m, ff.SubgraphNode | ff.InnerSubgraphNode):
            graph = self.subgraph(m.graph, (*path, "graph"), node_id)
            return SubgraphNode(**common, source=source, graph=graph)
        raise AssertionError(f"unhandled node model {type(m).__name__}")  # pragma: no cover

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
                        f"expected a reference, got {_describe_value(r)} ({_REF_HINT})",
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
            self.fail(path, f"default {_describe_value(default)} does not fit the type: {first}")

    # -- positions ---------------------------------------------------------------------

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
            if isinstance(value, dict):
                for sub, subval in value.items():
                    label = ff.label_text(sub) if name == "routes" else sub
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
