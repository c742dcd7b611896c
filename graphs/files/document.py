"""A workflow file parsed with the position of every part, and the error that points into
it: `WorkflowFileError` (`FILE:LINE:COL: FIELD: WHAT`).

YAML is parsed with ruamel.yaml's round-trip loader, which remembers the line and column
of every mapping key, value and sequence item. JSON is parsed with `json` (the authority
on what JSON means) and then again with ruamel, only for the positions.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    MappingEndEvent,
    MappingStartEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean

from treadle.errors import GraphError
from treadle.graphs.kinds.base import DocPath
from treadle.graphs.kinds.file_fields import NODE_ID_PATTERN
from treadle.graphs.spec import Pos

__all__ = ["DOCUMENT", "DocPath", "Document", "Format", "WorkflowFileError", "parse"]

Format = Literal["yaml", "json"]

#: the field path used for problems that belong to the whole document
DOCUMENT = "(document)"

_NODE_ID = re.compile(NODE_ID_PATTERN)
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


@dataclass
class Document:
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
            self.file, pos.line, pos.col, field or field_text(self.data, path), problem
        )


#: mappings and lists nested deeper than this are refused: no workflow needs them, and
#: the passes over a document (the YAML constructor, validation, resolving) recurse
MAX_DEPTH = 100


def parse(text: str, file: str, fmt: Format) -> Document:
    """The document's data and positions (`WorkflowFileError` if it does not parse, nests
    deeper than `MAX_DEPTH`, or holds what a workflow file must not: custom tags, sets,
    self-containing aliases)."""
    try:
        if fmt == "json":
            return _parse_json(text, file)
        root = _load_yaml(text, file)
        doc = Document(file, None)
        doc.data = _plain(root, (), doc, set(), strict=True)
    except RecursionError:
        # a parser ran out of stack first: find where the nesting passes the limit
        raise _too_deep(text, file) from None
    if doc.refused:
        raise doc.error(*doc.refused[0])
    return doc


def _too_deep(text: str, file: str) -> WorkflowFileError:
    """The error for the first mapping or list nested deeper than `MAX_DEPTH`, found from
    the parser's events (a loop: it cannot run out of stack)."""
    depth = 0
    line, col = 1, 1
    try:
        for event in YAML(typ="rt").parse(text):
            if isinstance(event, MappingStartEvent | SequenceStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    line, col = event.start_mark.line + 1, event.start_mark.column + 1
                    break
            elif isinstance(event, MappingEndEvent | SequenceEndEvent):
                depth -= 1
    except YAMLError:
        pass  # the problem is reported where the scan stopped (or at the start)
    return WorkflowFileError(file, line, col, DOCUMENT, f"nested more than {MAX_DEPTH} levels deep")


def _load_yaml(text: str, file: str) -> Any:
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text)
    except DuplicateKeyError:
        raise _duplicate_key_error(text, file) from None
    except MarkedYAMLError as exc:
        line, col, what = yaml_syntax_error(exc)
        raise WorkflowFileError(file, line, col, DOCUMENT, f"YAML syntax error: {what}") from None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise WorkflowFileError(file, line, col, DOCUMENT, f"cannot parse YAML: {exc}") from None


def yaml_syntax_error(exc: MarkedYAMLError) -> tuple[int, int, str]:
    """Line, column and message of a YAML syntax error. A string or a flow collection that
    is never closed is reported where it starts: the parser only notices at the end of
    the file, or where the next line no longer fits, lines later."""
    problem, context = exc.problem or "", exc.context or ""
    end, start = exc.problem_mark, exc.context_mark
    if start is not None and end is not None:
        at = f"{end.line + 1}:{end.column + 1}"
        if "quoted scalar" in context and "end of stream" in problem:
            return (
                start.line + 1,
                start.column + 1,
                f"quoted string is never closed (the file ends at {at})",
            )
        if "flow mapping" in context or "flow sequence" in context:
            bracket = "{" if "mapping" in context else "["
            found = problem.replace("'<stream end>'", "the end of the file")
            return start.line + 1, start.column + 1, f"{bracket!r} is not closed: {found} at {at}"
    mark = end or start
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return line, col, problem or context or "invalid YAML"


def _parse_json(text: str, file: str) -> Document:
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
    doc = Document(file, data)
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
        data = _plain(lenient.load(text), (), Document(file, None), set(), strict=False)
    except YAMLError:  # pragma: no cover - it parsed up to the duplicate a moment ago
        data = None
    field = field_text(data, (*path, key))
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


def _plain(node: Any, path: DocPath, doc: Document, active: set[int], *, strict: bool) -> Any:
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
        if len(path) >= MAX_DEPTH:
            raise _too_deep_at(doc, path)
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


def _too_deep_at(doc: Document, path: DocPath) -> WorkflowFileError:
    line, col = doc.values.get(path, (0, 0))
    return WorkflowFileError(
        doc.file, line + 1, col + 1, DOCUMENT, f"nested more than {MAX_DEPTH} levels deep"
    )


def _plain_container(
    node: CommentedMap | CommentedSeq,
    path: DocPath,
    doc: Document,
    active: set[int],
    *,
    strict: bool,
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


def field_text(data: Any, path: DocPath) -> str:
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


def describe_value(value: Any) -> str:
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
