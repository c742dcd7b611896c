"""Checking a parsed workflow file against the file format (`treadle.graphs.files.schema`),
and turning pydantic's first error into a `WorkflowFileError` at its place in the file:
typos before omissions, then in document order, with "did you mean" and the fields allowed
where an unknown one was written.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from types import UnionType
from typing import Any

from pydantic import BaseModel, ValidationError

from treadle.graphs.files import schema as ff
from treadle.graphs.files.document import (
    DocPath,
    Document,
    WorkflowFileError,
    describe_value,
)
from treadle.graphs.files.typeref import did_you_mean
from treadle.graphs.kinds.branch import label_text

__all__ = ["validate"]


def validate(doc: Document) -> ff.Workflow:
    if not isinstance(doc.data, dict):
        got = "an empty document" if doc.data is None else describe_value(doc.data)
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


def _problem(doc: Document, err: Any) -> _Problem:
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
        return _Problem(doc.error(path, f"{err['msg']}, got {describe_value(value)}"), False)
    if kind == "string_pattern_mismatch":
        meaning = ff.PATTERN_MEANING.get(err.get("ctx", {}).get("pattern", ""), "valid here")
        what = f"{value!r} is not {meaning}"
        return _Problem(doc.error(path, what, key=on_key), False)
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        what = f"expected one of {expected}, got {describe_value(value)}"
        return _Problem(doc.error(path, what), False)
    if kind in _EXPECTED:
        what = f"expected {_EXPECTED[kind]}, got {describe_value(value)}"
        return _Problem(doc.error(path, what, key=on_key), False)
    if kind == "too_short" and isinstance(value, str | dict | list):
        least = int(err.get("ctx", {}).get("min_length", 1))
        what = "must not be empty" if least <= 1 else f"must have at least {least} entries"
        return _Problem(doc.error(path, what), False)
    msg = str(err["msg"])
    msg = msg.replace("Input should be", "must be").replace("String should", "must")
    if found and not isinstance(value, dict | list):
        msg += f", got {describe_value(value)}"
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
        if label_text(k) == part:
            return k
    return _NO_KEY


def _kind_error(doc: Document, path: DocPath, value: Any) -> WorkflowFileError:
    kinds = ", ".join(ff.FILE_KINDS)
    if not isinstance(value, dict):
        return doc.error(
            path, f"a node must be a mapping with `kind` ({kinds}), got {describe_value(value)}"
        )
    if "kind" not in value:
        return doc.error((*path, "kind"), f"required field is missing (one of {kinds})")
    kind = value["kind"]
    if not isinstance(kind, str):
        return doc.error((*path, "kind"), f"expected one of {kinds}, got {describe_value(kind)}")
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
