"""Names in workflow files -> Python objects: type strings and import paths.

`parse_type("list[Hit] | None", local_types={"Hit": Hit})` returns `list[Hit] | None`, the
very object Python builds for that annotation, so a graph loaded from a file compares
equal to the one written with the SDK. The text is parsed with `ast` and only whitelisted
names, subscripts, `|` and literal constants are interpreted; nothing is ever evaluated.

`import_object("pkg.module:attr")` imports a module and walks to the attribute. A module
that is not importable from `sys.path` is also looked for in `search_dirs` (the workflow
file's folder, then the working directory), so a workflow can sit next to its Python code
and run with `treadle run flow.yaml` from anywhere.
"""

from __future__ import annotations

import ast
import datetime
import decimal
import difflib
import importlib
import importlib.machinery
import importlib.util
import re
import sys
import typing
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from treadle.errors import GraphError

__all__ = [
    "BUILTIN_TYPES",
    "ImportPathError",
    "TypeRefError",
    "did_you_mean",
    "import_object",
    "is_type_like",
    "parse_type",
]


class TypeRefError(GraphError, ValueError):
    """A type string or import path that cannot be resolved; the message says why."""


class ImportPathError(TypeRefError):
    """An import path whose module or attribute cannot be found or imported."""


#: plain names a type string may use
BUILTIN_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "bytes": bytes,
    "object": object,
    "Any": Any,
    "None": None,
    "datetime": datetime.datetime,
    "date": datetime.date,
    "time": datetime.time,
    "timedelta": datetime.timedelta,
    "UUID": uuid.UUID,
    "Decimal": decimal.Decimal,
    # generic containers (also usable bare: `list` means `list[Any]`)
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "List": typing.List,  # noqa: UP006 - the typing spelling yields the typing object
    "Dict": typing.Dict,  # noqa: UP006
    "Tuple": typing.Tuple,  # noqa: UP006
    "Set": typing.Set,  # noqa: UP006
    "FrozenSet": typing.FrozenSet,  # noqa: UP006
    "Optional": typing.Optional,
    "Union": typing.Union,
    "Literal": typing.Literal,
}

_SUBSCRIPTABLE = {
    "list",
    "dict",
    "tuple",
    "set",
    "frozenset",
    "List",
    "Dict",
    "Tuple",
    "Set",
    "FrozenSet",
    "Optional",
    "Union",
    "Literal",
}
_NEEDS_PARAMS = {"Optional", "Union", "Literal"}
_ARITY = {"list": 1, "set": 1, "frozenset": 1, "List": 1, "Set": 1, "FrozenSet": 1}
_ARITY |= {"dict": 2, "Dict": 2, "Optional": 1}

_MAX_TEXT = 2000  # a type string longer than this is a mistake, not a type
_IMPORT_PREFIX = "__treadle_import_"
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
# quoted strings are matched (and kept) so an import path is only looked for outside them
_TOKEN = re.compile(rf"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|(?P<path>{_DOTTED}:{_DOTTED})""")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_type_like(obj: Any) -> bool:
    """Whether `obj` can stand in an annotation (a class, a typing construct, None)."""
    return (
        obj is None
        or obj is Any
        or isinstance(obj, type | typing.TypeVar)
        or typing.get_origin(obj) is not None
        or type(obj).__name__ == "TypeAliasType"  # `type X = ...` (Python 3.12+)
    )


def parse_type(
    text: str,
    *,
    local_types: Mapping[str, Any] | None = None,
    search_dirs: Sequence[Path] = (),
) -> Any:
    """Resolve a type string to the object Python would build for that annotation.

    `local_types` adds names (a workflow's `types:`); they shadow nothing, since the
    loader refuses local names that collide with built-in ones. Raises `TypeRefError`.
    """
    if not isinstance(text, str) or not text.strip():
        raise TypeRefError("a type must be a non-empty string")
    if len(text) > _MAX_TEXT:
        raise TypeRefError(f"type string is longer than {_MAX_TEXT} characters")
    local = local_types if local_types is not None else {}
    imports: dict[str, str] = {}

    def stash(match: re.Match[str]) -> str:
        if match.group("path") is None:
            return match.group(0)
        name = f"{_IMPORT_PREFIX}{len(imports)}"
        imports[name] = match.group("path")
        return name

    source = _TOKEN.sub(stash, text.strip())
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise TypeRefError(f"type {text!r} is not valid syntax: {exc.msg}") from None
    return _Resolver(text, local, imports, search_dirs).resolve(tree.body)


class _Resolver:
    """Walks a parsed type expression; every construct it does not know is an error."""

    def __init__(
        self,
        text: str,
        local: Mapping[str, Any],
        imports: dict[str, str],
        search_dirs: Sequence[Path],
    ) -> None:
        self.text = text
        self.local = local
        self.imports = imports
        self.search_dirs = search_dirs

    def fail(self, what: str) -> TypeRefError:
        return TypeRefError(f"type {self.text!r}: {what}")

    def resolve(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            left, right = self.resolve(node.left), self.resolve(node.right)
            try:
                return left | right
            except TypeError:
                raise self.fail(f"cannot form the union {ast.unparse(node)}") from None
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            module, _, attr = dotted.rpartition(".")
            raise self.fail(f"write an import path as '{module}:{attr}', not {dotted!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            raise self.fail(f"quoted names are only allowed inside Literal[...]: {node.value!r}")
        raise self.fail(f"{ast.unparse(node)!r} is not a type")

    def name(self, name: str) -> Any:
        if name.startswith(_IMPORT_PREFIX) and name in self.imports:
            path = self.imports[name]
            obj = import_object(path, search_dirs=self.search_dirs)
            if not is_type_like(obj):
                raise self.fail(f"{path!r} is a {type(obj).__name__}, not a type")
            return obj
        if name in self.local:
            return self.local[name]
        if name in _NEEDS_PARAMS:
            raise self.fail(f"{name} needs parameters: {name}[...]")
        if name in BUILTIN_TYPES:
            return BUILTIN_TYPES[name]
        known = [*BUILTIN_TYPES, *self.local]
        hint = did_you_mean(name, known)
        local_note = f"; types declared here: {', '.join(self.local)}" if self.local else ""
        raise self.fail(
            f"unknown type {name!r}{hint}{local_note} (an imported type is written "
            "'package.module:Name')"
        )

    def subscript(self, node: ast.Subscript) -> Any:
        if not isinstance(node.value, ast.Name) or node.value.id not in _SUBSCRIPTABLE:
            base = ast.unparse(node.value)
            raise self.fail(f"{base!r} cannot take parameters [...]")
        origin = node.value.id
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if not elts:
            raise self.fail(f"{origin}[] needs parameters")
        if origin == "Literal":
            args: list[Any] = [self.literal(e) for e in elts]
        elif origin in ("tuple", "Tuple"):
            args = self.tuple_args(elts)
        else:
            args = [self.resolve(e) for e in elts]
        want = _ARITY.get(origin)
        if want is not None and len(args) != want:
            raise self.fail(f"{origin}[...] takes {want} parameter(s), got {len(args)}")
        target = BUILTIN_TYPES[origin]
        try:
            return target[tuple(args)] if len(args) > 1 else target[args[0]]
        except TypeError as exc:
            raise self.fail(str(exc)) from None

    def tuple_args(self, elts: list[ast.expr]) -> list[Any]:
        args: list[Any] = []
        for i, e in enumerate(elts):
            if isinstance(e, ast.Constant) and e.value is Ellipsis:
                if i != 1 or len(elts) != 2:
                    raise self.fail("'...' is only allowed as tuple[T, ...]")
                args.append(Ellipsis)
            else:
                args.append(self.resolve(e))
        return args

    def literal(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, str | int | bool | bytes):
            return node.value
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) is int
        ):
            return -node.operand.value
        raise self.fail(
            f"Literal[...] takes strings, integers, booleans or None, not {ast.unparse(node)}"
        )


# -- import paths ----------------------------------------------------------------------


def import_object(path: str, *, search_dirs: Sequence[Path] = ()) -> Any:
    """Import `package.module:attr.sub` and return the attribute. Raises `ImportPathError`."""
    module_name, sep, attr = path.partition(":")
    if not sep or not re.fullmatch(_DOTTED, module_name) or not re.fullmatch(_DOTTED, attr):
        raise ImportPathError(f"{path!r} is not an import path like 'package.module:name'")
    module = _import_module(module_name, search_dirs)
    obj: Any = module
    walked = module_name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ImportPathError(
                f"{walked!r} has no attribute {part!r}{did_you_mean(part, names)}"
            ) from None
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    return obj


def _import_module(name: str, search_dirs: Sequence[Path]) -> Any:
    found = _import_or_missing(name)
    if not isinstance(found, ModuleNotFoundError):
        return found
    missing = found
    top = name.partition(".")[0]
    if top not in sys.modules:
        for folder in search_dirs:
            spec = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[top] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                # a half-initialised module must not stay importable
                sys.modules.pop(top, None)
                raise ImportPathError(
                    f"importing {top!r} from {folder} raised {type(exc).__name__}: {exc}"
                ) from exc
            found = _import_or_missing(name)
            if not isinstance(found, ModuleNotFoundError):
                return found
            missing = found
            break
    where = "".join(f", {d}" for d in search_dirs)
    raise ImportPathError(
        f"no module named {missing.name or name!r} (looked on sys.path{where})"
    ) from None


def _import_or_missing(name: str) -> ModuleType | ModuleNotFoundError:
    """The module, or the `ModuleNotFoundError` saying that `name` itself does not exist."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not _is_missing(exc, name):
            # the module exists but something it imports does not: say so, not "not found"
            raise ImportPathError(f"importing {name!r} failed: {exc}") from exc
        return exc
    except Exception as exc:
        raise ImportPathError(f"importing {name!r} raised {type(exc).__name__}: {exc}") from exc


def _is_missing(exc: ModuleNotFoundError, name: str) -> bool:
    """Whether the error is about `name` itself (or one of its parents)."""
    return exc.name is None or name == exc.name or name.startswith(exc.name + ".")
