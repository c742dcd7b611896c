"""LLMCompiler-style plans, parsed incrementally as the planner's tokens arrive.

A plan is one task a line, in the format LLMCompiler's planner writes:

    Thought: both heights are needed
    1. search("Mount Everest height")
    2. search("K2 height")
    3. calculator("$1 - $2")
    4. join()<END_OF_PLAN>

`PlanParser.feed(delta)` takes streamed text and returns what became complete: a `Task`
(dispatchable), a `Join`, a `Thought`, or a `PlanError` that says, for the joiner, what is
wrong with a line. A task is returned as soon as its closing parenthesis arrives (the rest
of its line may only be a `# comment` or `<END_OF_PLAN>`), so it can start before the
newline does; a call whose brackets or quotes are still open continues on the next line.

Arguments are Python/JSON literals (positional in the tool's parameter order, or by
keyword), and references to earlier results: `$N` or `${N}` (the whole result, typed), and
`$N.field` / `${N.field}` (a field of it). Inside a string a reference is replaced by the
result's text, unless the string is exactly one reference, which then counts as a bare
one; `$$` is a literal dollar sign. `resolve_args` substitutes results, converting a value
to the type the tool's JSON Schema asks for (a number, a list, text) — the tool validates
the outcome.

Malformed lines never hang a plan: an unknown tool, bad or missing arguments, a reference
to a later, missing or invalid task, a task that refers to itself (the only cycle possible
when references must point backwards), a task id that does not increase, or text that
cannot be parsed all produce a `PlanError` with the task id when there is one.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from treadle.errors import RunError
from treadle.runtime.core.values import as_text
from treadle.tools import Tool

#: the marker LLMCompiler's planner writes after `join()`
END_OF_PLAN = "<END_OF_PLAN>"
JOIN = "join"

PathPart = str | int


@dataclass(frozen=True)
class TaskRef:
    """`$N` (or `$N.a.b`): the result of task N, or a field inside it."""

    task: int
    path: tuple[PathPart, ...] = ()

    def __str__(self) -> str:
        return "$" + ".".join([str(self.task), *map(str, self.path)])


@dataclass(frozen=True)
class Template:
    """A string argument with references inside: its literal parts and `TaskRef`s in order."""

    parts: tuple[str | TaskRef, ...]


@dataclass
class Task:
    """A dispatchable plan line. `args` maps parameter names to literal JSON values, in
    which `TaskRef`s and `Template`s stand for results that are substituted at dispatch."""

    idx: int
    tool: str
    args: dict[str, Any]
    deps: tuple[int, ...]
    #: the call as written (`search("x")`), used to recognise the same task on resume
    line: str


@dataclass
class Join:
    idx: int | None
    line: str


@dataclass
class Thought:
    text: str


@dataclass
class PlanError:
    """A line that cannot run; `idx` is its task id when the line had one."""

    line: str
    message: str
    idx: int | None = None

    def __str__(self) -> str:
        where = f"task {self.idx}" if self.idx is not None else "plan"
        return f"{where}: {self.message} (line: {self.line.strip()[:120]!r})"


PlanItem = Task | Join | Thought | PlanError


class ArgumentResolutionError(RunError, ValueError):
    """A reference could not be substituted (e.g. `$1.missing_field`)."""


# -- the incremental parser -------------------------------------------------------------

_TASK_LINE = re.compile(r"\s*(?:[-*]\s*)?(\d+)\s*[.):]\s*(.*)", re.S)
_CALL_HEAD = re.compile(r"([A-Za-z_][\w.\-]*)\s*\(")
_BARE_CALL = re.compile(r"\s*[A-Za-z_][\w.\-]*\s*\(")
_THOUGHT = re.compile(r"\s*(?:#+\s*)?thought\s*\d*\s*:\s*(.*)", re.I | re.S)
_BARE_JOIN = re.compile(r"join\s*(?:\(\s*\))?\s*(?:#.*)?", re.S)
_REF_OUTSIDE = re.compile(r"\$\{(\d+)((?:\.\w+)*)\}|\$(\d+)")
_REF_INSIDE = re.compile(r"\$\$|\$\{(\d+)((?:\.\w+)*)\}|\$(\d+)")
_REF_NAME = re.compile(r"__treadle_ref_(\d+)__")


class PlanParser:
    """Parses a streamed plan. `known` are the ids of tasks from earlier plans (of the same
    planner node), which new tasks may refer to; `invalid` those among them that failed."""

    def __init__(
        self,
        tools: Mapping[str, Tool],
        *,
        known: Iterable[int] = (),
        invalid: Iterable[int] = (),
    ) -> None:
        self.tools = tools
        self.defined: set[int] = set(known)
        self.invalid: set[int] = set(invalid)
        self.last_idx = max(self.defined, default=0)
        self.joined = False
        self.text_parts: list[str] = []
        #: text after join() or END_OF_PLAN that was not part of the plan
        self.ignored: list[str] = []
        self._line = ""  # the current (incomplete) line
        self._pending = ""  # earlier lines of a task whose brackets are still open
        self._early = False  # the current line's task was already emitted at its ')'
        self._early_at = 0

    # -- feeding -------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def feed(self, delta: str) -> list[PlanItem]:
        """Items completed by `delta` (usually none: most deltas end no line)."""
        self.text_parts.append(delta)
        if "\n" not in delta:
            self._line += delta
            if ")" in delta and not self._early and not self.joined:
                return self._try_early()
            return []
        items: list[PlanItem] = []
        pieces = (self._line + delta).split("\n")
        self._line = pieces.pop()
        for line in pieces:
            items.extend(self._complete_line(line))
        if self._line and ")" in self._line and not self.joined:
            items.extend(self._try_early())
        return items

    def finish(self) -> list[PlanItem]:
        """The stream ended: parse what is left."""
        items: list[PlanItem] = []
        if self._line:
            line, self._line = self._line, ""
            items.extend(self._complete_line(line))
        if self._pending and not self.joined:
            text, self._pending = self._pending, ""
            items.append(self._error_for(text, "the call is not closed before the plan ended"))
        return items

    def parse_all(self, text: str) -> list[PlanItem]:
        """Parse a whole plan at once (no streaming)."""
        return [*self.feed(text), *self.finish()]

    # -- lines ---------------------------------------------------------------------------

    def _try_early(self) -> list[PlanItem]:
        """The current line may already hold a complete call: emit it before its newline."""
        text = self._pending + "\n" + self._line if self._pending else self._line
        match = _TASK_LINE.match(text)
        if match is None:
            return []
        body = match.group(2)
        head = _CALL_HEAD.match(body)
        if head is None:
            return []
        close = _scan_call(body, head.end())
        if close.end is None:
            return []
        self._early = True
        # where the call ends within the current line: the rest of the line is a trailer
        self._early_at = match.start(2) + close.end - (len(text) - len(self._line))
        self._pending = ""
        return self._task(int(match.group(1)), body[: close.end], text)

    def _complete_line(self, line: str) -> list[PlanItem]:
        early, self._early = self._early, False
        if early:
            # this line's call was emitted at its ')'; the rest may only be a trailer
            return self._trailer(line[self._early_at :])
        if self.joined:
            if line.strip():
                self.ignored.append(line)
            return []
        if self._pending:
            if _TASK_LINE.match(line) is None or not line.strip():
                text, self._pending = self._pending + "\n" + line, ""
                return self._statement(text)
            # a new task starts while the previous call is still open
            text, self._pending = self._pending, ""
            return [
                self._error_for(text, "the call is not closed (missing ')' or quote)"),
                *self._statement(line),
            ]
        return self._statement(line)

    def _trailer(self, rest: str) -> list[PlanItem]:
        rest = rest.strip()
        if rest.startswith(END_OF_PLAN):
            self.joined = True
            rest = rest[len(END_OF_PLAN) :].strip()
        if not rest or rest.startswith("#"):
            return []
        if self.joined:
            self.ignored.append(rest)
            return []
        return [PlanError(rest, "text after a task's call was ignored (one task a line)")]

    def _statement(self, line: str) -> list[PlanItem]:
        stripped = line.strip()
        if not stripped or stripped.startswith("```"):
            return []
        if stripped.startswith(END_OF_PLAN):
            self.joined = True
            return []
        thought = _THOUGHT.match(line)
        if thought is not None:
            return [Thought(thought.group(1).strip())]
        match = _TASK_LINE.match(line)
        if match is None:
            if _BARE_JOIN.fullmatch(stripped):
                self.joined = True
                return [Join(None, stripped)]
            if _BARE_CALL.match(line):
                return [
                    PlanError(line, "a task line must start with its id, e.g. '1. search(\"x\")'")
                ]
            return [Thought(stripped)]  # prose around the plan: kept for the joiner
        idx, body = int(match.group(1)), match.group(2)
        head = _CALL_HEAD.match(body)
        if head is not None and _scan_call(body, head.end()).end is None:
            self._pending = line  # brackets or quotes still open: wait for more lines
            return []
        return self._task(idx, body, line)

    def _task(self, idx: int, body: str, line: str) -> list[PlanItem]:
        body = body.strip()
        if body.endswith(END_OF_PLAN):
            body = body[: -len(END_OF_PLAN)].rstrip()
            self.joined = True
        if _BARE_JOIN.fullmatch(body):
            self.joined = True
            self._claim(idx)
            return [Join(idx, body)]
        try:
            self._check_id(idx)
            head = _CALL_HEAD.match(body)
            if head is None:
                raise _LineError(
                    "expected a call like 'tool(arguments)' after the task id"
                    + (" (a thought goes on its own 'Thought:' line)" if body else "")
                )
            name = head.group(1)
            close = _scan_call(body, head.end())
            assert close.end is not None
            trailer = body[close.end :].strip()
            if trailer.startswith(END_OF_PLAN):
                self.joined = True
            elif trailer and not trailer.startswith("#"):
                raise _LineError(f"unexpected text after the call: {trailer[:40]!r}")
            if name == JOIN:
                self._claim(idx)
                return [Join(idx, body[: close.end])]
            tool = self.tools.get(name)
            if tool is None:
                known = ", ".join([*self.tools, "join"])
                raise _LineError(f"unknown tool {name!r} (available: {known})")
            args = self._arguments(tool, close.code)
            deps = self._deps(idx, args)
        except _LineError as exc:
            # the error keeps the id only if the id is this line's (not a reused one)
            claimed = self._claim(idx, valid=False)
            return [PlanError(line, str(exc), idx if claimed else None)]
        self._claim(idx)
        return [Task(idx, name, args, deps, body[: close.end].strip())]

    def _check_id(self, idx: int) -> None:
        if idx in self.defined:
            raise _LineError(f"task id {idx} is used twice")
        if idx <= self.last_idx:
            raise _LineError(f"task ids must increase: {idx} comes after {self.last_idx}")

    def _claim(self, idx: int | None, valid: bool = True) -> bool:
        """Record `idx` as used by the current line; False if it cannot be (taken, or not
        increasing)."""
        if idx is None or idx in self.defined or idx <= self.last_idx:
            return False
        self.defined.add(idx)
        self.last_idx = idx
        if not valid:
            self.invalid.add(idx)
        return True

    def _error_for(self, text: str, message: str) -> PlanError:
        match = _TASK_LINE.match(text)
        idx = int(match.group(1)) if match else None
        claimed = self._claim(idx, valid=False)
        return PlanError(text, message, idx if claimed else None)

    # -- arguments -----------------------------------------------------------------------

    def _parameters(self, tool: Tool) -> list[str]:
        return list(tool.parameters_schema.get("properties", {}))

    def _arguments(self, tool: Tool, code: str) -> dict[str, Any]:
        try:
            call = ast.parse(f"_({code})", mode="eval").body
        except SyntaxError as exc:
            raise _LineError(f"cannot parse the arguments: {exc.msg}") from None
        assert isinstance(call, ast.Call)
        params = self._parameters(tool)
        if len(call.args) > len(params):
            raise _LineError(
                f"{tool.name} takes {len(params)} argument(s) ({', '.join(params) or 'none'}), "
                f"got {len(call.args)}"
            )
        args: dict[str, Any] = {}
        for name, node in zip(params, call.args, strict=False):
            if isinstance(node, ast.Starred):
                raise _LineError("'*' arguments are not allowed")
            args[name] = _literal(node)
        for kw in call.keywords:
            if kw.arg is None:
                raise _LineError("'**' arguments are not allowed")
            if kw.arg in args:
                raise _LineError(f"argument {kw.arg!r} is given twice")
            if kw.arg not in params:
                raise _LineError(
                    f"{tool.name} has no parameter {kw.arg!r} (parameters: {', '.join(params)})"
                )
            args[kw.arg] = _literal(kw.value)
        required = tool.parameters_schema.get("required", [])
        missing = [p for p in required if p not in args]
        if missing:
            raise _LineError(f"missing required argument(s) of {tool.name}: {', '.join(missing)}")
        return args

    def _deps(self, idx: int, args: dict[str, Any]) -> tuple[int, ...]:
        deps: list[int] = []
        for ref in _refs(args):
            n = ref.task
            if n == idx:
                raise _LineError(f"${n} refers to this task's own result (a cycle)")
            if n > idx:
                raise _LineError(
                    f"${n} refers to a later task; a task may only use results of earlier tasks"
                )
            if n not in self.defined:
                raise _LineError(f"${n} refers to task {n}, which does not exist")
            if n in self.invalid:
                raise _LineError(f"${n} refers to task {n}, which is itself invalid")
            if n not in deps:
                deps.append(n)
        return tuple(deps)


class _LineError(RunError):
    """One plan line is invalid (caught in this module: it becomes a `PlanError`)."""


@dataclass
class _Scan:
    #: the argument text with bare references rewritten to names Python can parse
    code: str
    #: index just after the closing ')' in the scanned text; None while still open
    end: int | None


def _scan_call(text: str, start: int) -> _Scan:
    """Scan a call's arguments from just after its '(' to the matching ')'."""
    out: list[str] = []
    depth = 1
    i, n = start, len(text)
    quote: str | None = None
    while i < n:
        c = text[i]
        if quote is not None:
            if c == "\\":
                out.append(text[i : i + 2])
                i += 2
                continue
            if text.startswith(quote, i):
                out.append(quote)
                i += len(quote)
                quote = None
                continue
            out.append(c)
            i += 1
            continue
        if c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            out.append(quote)
            i += len(quote)
            continue
        if c == "$":
            m = _REF_OUTSIDE.match(text, i)
            if m is not None:
                num = m.group(1) or m.group(3)
                out.append(f"__treadle_ref_{num}__{m.group(2) or ''}")
                i = m.end()
                continue
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return _Scan("".join(out), i + 1)
        out.append(c)
        i += 1
    return _Scan("".join(out), None)


_CONSTANT_NAMES: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "none": None,
    "True": True,
    "False": False,
    "None": None,
}


def _literal(node: ast.expr) -> Any:
    """A JSON value from an argument's syntax tree, with `TaskRef`/`Template` for refs."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            return _template(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        raise _LineError(f"{type(value).__name__} values are not allowed in arguments")
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                raise _LineError("'**' is not allowed inside a dict")
            key = _literal(k)
            if not isinstance(key, str | int | float | bool):
                raise _LineError("dict keys must be literal strings or numbers")
            out[str(key)] = _literal(v)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
        ref = _reference(node)
        if ref is not None:
            return ref
        if isinstance(node, ast.Name):
            if node.id in _CONSTANT_NAMES:
                return _CONSTANT_NAMES[node.id]
            raise _LineError(
                f"unknown name {node.id!r} (quote text as a string; use $N for task results)"
            )
    raise _LineError(
        f"{type(node).__name__} expressions are not evaluated in plans; arguments are "
        "literals or $N references (compute with a tool instead)"
    )


def _reference(node: ast.expr) -> TaskRef | None:
    path: list[PathPart] = []
    while True:
        if isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if not (isinstance(key, ast.Constant) and isinstance(key.value, int | str)):
                raise _LineError("a reference may be indexed only by a literal number or key")
            path.append(key.value)
            node = node.value
        else:
            break
    if isinstance(node, ast.Name):
        m = _REF_NAME.fullmatch(node.id)
        if m is not None:
            return TaskRef(int(m.group(1)), tuple(reversed(path)))
    if path:
        raise _LineError("attribute or index access is allowed only on $N references")
    return None


def _template(text: str) -> str | Template:
    if "$" not in text:
        return text
    parts: list[str | TaskRef] = []
    pos = 0
    literal: list[str] = []
    for m in _REF_INSIDE.finditer(text):
        literal.append(text[pos : m.start()])
        pos = m.end()
        if m.group(0) == "$$":
            literal.append("$")
            continue
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        if m.group(1) is not None:
            path = tuple(_path_part(p) for p in m.group(2).split(".")[1:])
            parts.append(TaskRef(int(m.group(1)), path))
        else:
            parts.append(TaskRef(int(m.group(3))))
    literal.append(text[pos:])
    tail = "".join(literal)
    if tail:
        parts.append(tail)
    if not any(isinstance(p, TaskRef) for p in parts):
        return "".join(p for p in parts if isinstance(p, str))
    return Template(tuple(parts))


def _path_part(text: str) -> PathPart:
    return int(text) if text.isdigit() else text


def _refs(value: Any) -> Iterable[TaskRef]:
    if isinstance(value, TaskRef):
        yield value
    elif isinstance(value, Template):
        yield from (p for p in value.parts if isinstance(p, TaskRef))
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)


# -- substitution ---------------------------------------------------------------------


@dataclass
class _Schema:
    root: dict[str, Any]
    defs: dict[str, Any] = field(default_factory=dict)

    def resolve(self, schema: Any) -> dict[str, Any]:
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 32:
            schema = self.defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
            seen += 1
        return schema if isinstance(schema, dict) else {}

    def types(self, schema: Any) -> set[str] | None:
        """The JSON types `schema` allows; None when it does not say (anything goes)."""
        s = self.resolve(schema)
        if "type" in s:
            t = s["type"]
            return set(t) if isinstance(t, list) else {str(t)}
        for key in ("anyOf", "oneOf"):
            if key in s:
                out: set[str] = set()
                for option in s[key]:
                    sub = self.types(option)
                    if sub is None:
                        return None
                    out |= sub
                return out
        if s.get("allOf"):
            return self.types(s["allOf"][0])
        for key in ("const", "enum"):
            if key in s:
                values = [s[key]] if key == "const" else list(s[key])
                return {_json_type(v) for v in values}
        return None

    def item_schema(self, schema: Any, key: str | int) -> Any:
        s = self.resolve(schema)
        for option in [s, *s.get("anyOf", []), *s.get("oneOf", [])]:
            o = self.resolve(option)
            if isinstance(key, int) and "items" in o:
                return o["items"]
            if isinstance(key, int) and "prefixItems" in o and key < len(o["prefixItems"]):
                return o["prefixItems"][key]
            if isinstance(key, str) and key in o.get("properties", {}):
                return o["properties"][key]
            if isinstance(key, str) and isinstance(o.get("additionalProperties"), dict):
                return o["additionalProperties"]
        return {}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object"


def _fits(value: Any, types: set[str]) -> bool:
    kind = _json_type(value)
    return kind in types or (kind == "integer" and "number" in types)


def resolve_args(
    task: Task, results: Mapping[int, Any], schema: Mapping[str, Any]
) -> dict[str, Any]:
    """`task.args` with every reference replaced by the result it names, converted to the
    type the parameter's JSON Schema wants where the result has another one."""
    sch = _Schema(dict(schema), dict(schema.get("$defs", {})))
    props = schema.get("properties", {})
    return {k: _substitute(v, props.get(k, {}), sch, results) for k, v in task.args.items()}


def _substitute(value: Any, schema: Any, sch: _Schema, results: Mapping[int, Any]) -> Any:
    if isinstance(value, TaskRef):
        return _coerce(_lookup(value, results), schema, sch)
    if isinstance(value, Template):
        if len(value.parts) == 1:
            return _coerce(_lookup(value.parts[0], results), schema, sch)  # type: ignore[arg-type]
        text = "".join(
            p if isinstance(p, str) else as_text(_lookup(p, results)) for p in value.parts
        )
        return _coerce(text, schema, sch)
    if isinstance(value, list):
        return [
            _substitute(v, sch.item_schema(schema, i), sch, results) for i, v in enumerate(value)
        ]
    if isinstance(value, dict):
        return {
            k: _substitute(v, sch.item_schema(schema, k), sch, results) for k, v in value.items()
        }
    return value


def _lookup(ref: TaskRef, results: Mapping[int, Any]) -> Any:
    if ref.task not in results:
        raise ArgumentResolutionError(f"${ref.task} has no result")
    value = results[ref.task]
    for part in ref.path:
        value = _plain_step(value, part, ref)
    return value


def _plain_step(value: Any, part: PathPart, ref: TaskRef) -> Any:
    if isinstance(value, str):
        # a text result that holds JSON (an observation from a remote tool, say)
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    try:
        if isinstance(value, BaseModel) and isinstance(part, str):
            return getattr(value, part)
        if isinstance(value, dict):
            return value[str(part)] if str(part) in value else value[part]
        if isinstance(value, list | tuple) and isinstance(part, int):
            return value[part]
    except (KeyError, IndexError, AttributeError):
        pass
    raise ArgumentResolutionError(
        f"{ref}: the result of task {ref.task} has no {part!r} "
        f"(it is {type(value).__name__}: {as_text(_plain(value))[:80]})"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def _coerce(value: Any, schema: Any, sch: _Schema) -> Any:
    """Make a substituted result the JSON type the schema wants, when it clearly can be."""
    types = sch.types(schema)
    if types is None:
        return _plain(value)
    if isinstance(value, BaseModel):
        if "string" in types and "object" not in types:
            return value.model_dump_json()
        return value.model_dump(mode="json")
    if _fits(value, types):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value  # the tool's validation says what is wrong
        return parsed if _fits(parsed, types) else value
    if "string" in types:
        return as_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and "array" in types:
        return [value]
    return value
