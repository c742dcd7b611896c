"""What a tenant's workflow definition may refer to, checked before it is registered.

A workflow file may name Python objects by import path (`pkg.mod:attr`: functions, tools,
types). Loading such a file imports the module, which runs its top-level code, and calling
the object runs it with inputs the tenant chooses. In a multi-tenant daemon that would let a
tenant run any installed code, so the daemon accepts import paths only under the module
prefixes the operator allows (`treadle serve --allow-imports treadle.examples,acme.tools`);
built-in tools (`calculator`, `http_fetch`, `read_file`) are always allowed.

The check runs in two passes:

1. `check_document` walks the parsed document BEFORE the loader sees it, so a refused
   module is never imported. It parses with the loader's own parsers (ruamel's round-trip
   YAML loader, `json`), so both see the same data; anything that fails to parse here fails
   in the loader too, before it resolves a single name. Import paths can only occur in the
   fields the loader resolves, which each node kind marks in its file fields
   (`NAMES_OBJECT`: `fn`, `reduce`, `route`, `tool`, `tools`, type strings); every string
   outside the kinds' other fields (prompts, literals, labels) is scanned, so a field the
   walk does not know is checked rather than skipped. It also refuses subgraph *files*
   (they would be read from the server's disk), `models:` entries whose backend is not
   allowed, that read the server's environment (`api_key_env`) or its files (the
   simulator's `profile` paths and `script`), and documents that YAML aliases blow up past
   `MAX_NODES` values.
2. `check_spec` walks the loaded `GraphSpec`: every function, tool and type its nodes name
   (each kind says which: `NodeKind.imported`) must come from an allowed module. This
   catches an allowed module re-exporting something else (`allowed.mod:os.system`
   resolves to `posix.system`), which pass 1 cannot see.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import YAMLError

from treadle.errors import DaemonError
from treadle.graphs.files.schema import INNER_NODE_MODELS
from treadle.graphs.kinds import Imported, graph_imports
from treadle.graphs.kinds.file_fields import NAMES_OBJECT, NESTED_GRAPH, NESTED_NODE, field_marks
from treadle.graphs.spec import GraphSpec
from treadle.runtime.daemon.config import DEFAULT_ALLOWED_BACKENDS
from treadle.tools import BUILTINS, Tool

#: values (including those YAML aliases repeat) a definition may expand to
MAX_NODES = 100_000

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
# the same tokenizer as the loader's type parser: quoted strings are skipped, so an import
# path is found exactly where the loader would resolve one
_TOKEN = re.compile(rf"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|(?P<path>{_DOTTED}:{_DOTTED})""")


def _roles(marks: set[Any]) -> str:
    if NESTED_NODE in marks:
        return "node"
    if NESTED_GRAPH in marks:
        return "graph"
    return "names" if NAMES_OBJECT in marks else "text"


# What each field of each node kind holds, from the kinds' file models: another node, a
# workflow, names of Python objects (scanned for import paths), or something the loader
# never resolves as a name (templates, bindings, literals, labels: skipped).
_NODE_FIELDS: dict[str, dict[str, str]] = {
    kind: {name: _roles(marks) for name, marks in field_marks(model).items()}
    for kind, model in INNER_NODE_MODELS.items()
}
# a node whose kind is missing or unknown (the loader refuses it): what any kind's is
_ANY_NODE_FIELDS: dict[str, str] = {}
for _fields in _NODE_FIELDS.values():
    for _name, _role in _fields.items():
        if _ANY_NODE_FIELDS.get(_name, "text") == "text":
            _ANY_NODE_FIELDS[_name] = _role
_WORKFLOW_TEXT = frozenset({"name", "description", "$schema", "outputs"})
# keys whose values are literals wherever they appear (input and field defaults)
_LITERAL_KEYS = frozenset({"default", "description"})
# modules whose classes are plain data types a type string may name without an import path
_TYPE_MODULES = frozenset(
    {"builtins", "typing", "types", "datetime", "uuid", "decimal", "collections.abc",
     "treadle.graphs.files.loader"}  # the loader's inline `types:` models
)  # fmt: skip

Path = tuple[str | int, ...]


class AllowListViolation(DaemonError, ValueError):
    """The definition refers to something the daemon does not allow (`FILE:LINE:COL: FIELD:
    WHAT`, like the loader's errors)."""


@dataclass(frozen=True)
class ImportAllowList:
    """What a registered definition may refer to: modules it may import from, backends it
    may declare (see the module docstring)."""

    allow_imports: tuple[str, ...] = ()
    allow_backends: tuple[str, ...] = DEFAULT_ALLOWED_BACKENDS

    # -- pass 1: the document --------------------------------------------------------

    def check_document(self, text: str, *, filename: str, fmt: str) -> None:
        data, tree = _parse(text, fmt)
        if data is None:
            return  # it does not parse: the loader reports where, before resolving anything
        walker = _Walker(self, filename, tree, data)
        walker.count(data)
        walker.workflow(data, ())

    def module_allowed(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.allow_imports)

    def import_problem(self, text: str) -> str | None:
        module, _, attr = text.partition(":")
        if any(part.startswith("_") for part in attr.split(".")):
            return f"import path {text!r}: private attributes ('_…') are not allowed"
        if not self.module_allowed(module):
            return (
                f"import path {text!r}: module {module!r} is not allowed here ({self._allowed()})"
            )
        return None

    def _allowed(self) -> str:
        if not self.allow_imports:
            return "this daemon allows no imports; built-in tools only"
        return "allowed: " + ", ".join(self.allow_imports)

    # -- pass 2: the loaded spec -----------------------------------------------------

    def check_spec(self, spec: GraphSpec) -> None:
        for ref in graph_imports(spec):
            self._check_imported(ref)

    def _check_imported(self, ref: Imported) -> None:
        where = f"{ref.graph}: {ref.where}"
        if ref.role == "function":
            self._check_object(ref.value, where)
        elif ref.role == "tool":
            self._check_tool(ref.value, where)
        else:
            self._check_type(ref.value, where)

    def _check_tool(self, tool: Tool, where: str) -> None:
        if any(tool is builtin for builtin in BUILTINS.values()):
            return
        self._check_object(tool.fn, where)

    def _check_object(self, obj: Any, where: str) -> None:
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str) or not self.module_allowed(module):
            raise AllowListViolation(
                f"{where}: {getattr(obj, '__qualname__', type(obj).__name__)} comes from "
                f"module {module!r}, which is not allowed here ({self._allowed()})"
            )

    def _check_type(self, tp: Any, where: str) -> None:
        for cls in _classes(tp, set()):
            module = getattr(cls, "__module__", "")
            if module not in _TYPE_MODULES and not self.module_allowed(module):
                raise AllowListViolation(
                    f"{where}: type {cls.__qualname__} comes from module {module!r}, "
                    f"which is not allowed here ({self._allowed()})"
                )


def _classes(tp: Any, seen: set[int]) -> Iterator[type]:
    """Every class a type annotation mentions, looking inside the loader's inline models."""
    if id(tp) in seen:
        return
    seen.add(id(tp))
    if isinstance(tp, types.ModuleType):
        raise AllowListViolation(f"a module ({tp.__name__}) is not a type")
    for arg in typing.get_args(tp):
        yield from _classes(arg, seen)
    origin = typing.get_origin(tp)
    if origin is not None:
        yield from _classes(origin, seen)
        return
    if isinstance(tp, type):
        yield tp
        if issubclass(tp, BaseModel) and tp.__module__ == "treadle.graphs.files.loader":
            for info in tp.model_fields.values():
                yield from _classes(info.annotation, seen)


def _parse(text: str, fmt: str) -> tuple[Any, Any]:
    """(data, tree with positions); (None, None) when the text does not parse."""
    try:
        tree = YAML(typ="rt").load(text)
    except (YAMLError, ValueError):
        tree = None
    if fmt == "json":
        try:
            return json.loads(text), tree
        except (json.JSONDecodeError, RecursionError):
            return None, None
    return tree, tree


class _Walker:
    def __init__(self, allowlist: ImportAllowList, filename: str, tree: Any, data: Any) -> None:
        self.allowlist = allowlist
        self.data = data
        self.filename = filename
        self.tree = tree

    def fail(self, path: Path, problem: str) -> AllowListViolation:
        line, col = _position(self.tree, path)
        return AllowListViolation(
            f"{self.filename}:{line}:{col}: {_field(self.data, path)}: {problem}"
        )

    def count(self, data: Any) -> None:
        """Refuse a document that expands (through YAML aliases, which the loader follows)
        to more than `MAX_NODES` values, before anything walks it value by value."""
        stack: list[tuple[Any, Path]] = [(data, ())]
        seen = 0
        while stack:
            value, path = stack.pop()
            seen += 1
            if seen > MAX_NODES:
                raise self.fail(
                    path, f"the definition expands to more than {MAX_NODES} values (YAML aliases?)"
                )
            if isinstance(value, dict):
                stack.extend((v, (*path, str(_text(k)))) for k, v in value.items())
            elif isinstance(value, list):
                stack.extend((v, (*path, i)) for i, v in enumerate(value))

    def workflow(self, data: Any, path: Path) -> None:
        if not isinstance(data, dict):
            return self.scan(data, path)
        for raw_key, value in data.items():
            key = _text(raw_key)
            sub = (*path, str(key))
            if isinstance(key, str) and key in _WORKFLOW_TEXT:
                continue
            if key == "models":
                self.models(value, sub)
            elif key == "nodes" and isinstance(value, list):
                for i, node in enumerate(value):
                    self.node(node, (*sub, i))
            else:  # inputs, types and anything unknown: every string is scanned
                self.scan(value, sub)
        return None

    def node(self, data: Any, path: Path) -> None:
        if not isinstance(data, dict):
            return self.scan(data, path)
        kind = _text(data.get("kind"))
        fields = _NODE_FIELDS.get(kind, _ANY_NODE_FIELDS) if isinstance(kind, str) else None
        fields = fields or _ANY_NODE_FIELDS
        for raw_key, value in data.items():
            key = _text(raw_key)
            sub = (*path, str(key))
            role = fields.get(key) if isinstance(key, str) else None
            if role == "text":
                continue
            if role == "node":  # one nested node (a map's), or a list (a race's branches)
                for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
                    self.node(item, sub if i is None else (*sub, i))
            elif role == "graph":
                if isinstance(value, dict):
                    self.workflow(value, sub)
                else:
                    raise self.fail(
                        sub,
                        "subgraph files are not available in the daemon; write the "
                        "subgraph inline (graph: {nodes: ...})",
                    )
            else:  # names (functions, tools, types) and anything unknown: scanned
                self.scan(value, sub)
        return None

    def scan(self, value: Any, path: Path) -> None:
        """Every import path in every string under `value` (defaults excepted)."""
        value = _text(value)
        if isinstance(value, str):
            for match in _TOKEN.finditer(value):
                if match["path"] is not None:
                    problem = self.allowlist.import_problem(match["path"])
                    if problem is not None:
                        raise self.fail(path, problem)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not (isinstance(k := _text(key), str) and k in _LITERAL_KEYS):
                    self.scan(item, (*path, str(key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.scan(item, (*path, i))

    def models(self, value: Any, path: Path) -> None:
        if not isinstance(value, dict):
            return
        for alias, config in value.items():
            self.backend(config, (*path, str(alias)))

    def backend(self, config: Any, path: Path) -> None:
        if not isinstance(config, dict):
            return  # the loader / compiler report a malformed entry
        kind = config.get("backend")
        allowed = self.allowlist.allow_backends
        if kind not in allowed:
            raise self.fail(
                (*path, "backend"),
                f"backend {kind!r} is not allowed here (allowed: {', '.join(allowed) or 'none'})",
            )
        if "api_key_env" in config:
            raise self.fail(
                (*path, "api_key_env"),
                "a workflow may not read the server's environment; ask the operator for a "
                "model alias that carries the credentials",
            )
        if kind == "sim":
            # the simulator can read a profile or a script from any path: bundled names only
            profile = config.get("profile")
            if profile is not None and not (
                isinstance(profile, str) and re.fullmatch(r"[A-Za-z0-9_\-]+", profile)
            ):
                raise self.fail(
                    (*path, "profile"), "only the simulator's bundled profiles, by name"
                )
            if "script" in config:
                raise self.fail((*path, "script"), "script files are not available here")
        from treadle.backends.factory import KINDS

        try:
            KINDS[str(kind)].model_validate(config)
        except (KeyError, ValidationError) as exc:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}"
                for e in getattr(exc, "errors", lambda: [])()
            )
            raise self.fail(path, f"invalid {kind!r} model entry: {detail or exc}") from None
        for i, replica in enumerate(config.get("replicas") or []):
            self.backend(replica, (*path, "replicas", i))


def _text(value: Any) -> Any:
    """A `!!str`-tagged YAML scalar is a string to the loader, so it is one here too."""
    if isinstance(value, TaggedScalar):
        return str(value.value)
    return value


def _position(tree: Any, path: Path) -> tuple[int, int]:
    """1-based line and column of `path` in the ruamel tree (of the nearest known parent)."""
    best = (1, 1)
    cur = tree
    for part in path:
        try:
            if isinstance(cur, CommentedMap) and part in cur:
                line, col = cur.lc.value(part)
            elif isinstance(cur, CommentedSeq) and isinstance(part, int) and part < len(cur):
                line, col = cur.lc.item(part)
            else:
                return best
        except (AttributeError, KeyError, TypeError):
            return best
        best = (line + 1, col + 1)
        cur = cur[part]
    return best


def _field(data: Any, path: Path) -> str:
    """`nodes[plan].fn`, naming list items of `nodes` by their id as the loader does."""
    out = ""
    cur = data
    for part in path:
        if isinstance(part, int):
            item = cur[part] if isinstance(cur, list) and part < len(cur) else None
            node_id = item.get("id") if isinstance(item, dict) else None
            out += f"[{node_id}]" if isinstance(node_id, str) else f"[{part}]"
            cur = item
        else:
            out += f".{part}" if out else part
            cur = cur.get(part) if isinstance(cur, dict) else None
    return out or "(document)"
