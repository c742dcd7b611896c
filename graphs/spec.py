"""The declared program as data: `GraphSpec`, the fields every node has (`NodeSpec`), its
options (`NodeOptions`), references between nodes, and where things were written.

Both the Python SDK (`treadle.graphs.builder`) and the workflow-file loader
(`treadle.graphs.files.loader`) produce these objects, with references already resolved to
Python objects (functions, `Tool`s, types). Two specs that describe the same program
compare equal; where a spec came from (`source`) does not take part in the comparison.
Each node kind adds its own fields in its module of `treadle.graphs.kinds`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: the pseudo-node that stands for the graph's inputs in a `Ref`
INPUT = "$input"
#: the pseudo-node that stands for the current element inside a `map`
ITEM = "$item"
#: the pseudo-node that stands for the current element's index inside a `map`
INDEX = "$index"
#: the pseudo-node that stands for the caught error inside an `on_error` handler
ERROR = "$error"

ErrorPolicy = Literal["fail", "skip", "fallback", "handler"]


class ErrorInfo(BaseModel):
    """A node's failure as a value: what an `on_error` handler binds as `$error`, and what
    a map with `max_failures` reports for each element that failed."""

    #: the exception's class name (`NodeTimeout`, `OutputError`, `ToolError`, ...)
    type: str
    message: str
    #: the node instance that failed (`fetch`, `m[3]`, `sub/x`)
    node: str
    #: the attempt that failed last (1 without retries)
    attempt: int = 1


class CacheOptions(BaseModel):
    """A node's result cache: a node whose key was seen within `ttl_s` takes the cached
    output instead of running (an LLM node then costs no tokens). The key is the node's
    identity (graph, node id, kind, definition: for an LLM node its model and prompt) and
    the values of its inputs, all of them or those named in `key`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ttl_s: float | None = Field(
        None, gt=0, description="Seconds a cached output stays valid (None: until evicted)."
    )
    key: list[str] | None = Field(
        None, description="The inputs that make up the key (default: all of them)."
    )


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


class NodeOptions(BaseModel):
    """How a node is retried, timed out, failed and limited: the options every kind takes
    (`retries=2, timeout_s=30, on_error="skip"` in the SDK, flat on the node in a file).

    The SDK checks option *names* when a node is declared (`NodeOptions.of`); their values
    are checked with the rest of the graph by `compile_graph`, which reports every problem
    at once (`problems()`). A workflow file's options are checked when it is loaded.
    """

    model_config = ConfigDict(extra="forbid")

    retries: int = Field(0, ge=0, description="Attempts after the first failure.")
    backoff_s: float = Field(0.1, ge=0, description="First retry delay (seconds).")
    backoff_max_s: float = Field(10.0, ge=0, description="Largest retry delay.")
    jitter: float = Field(0.5, ge=0, le=1, description="Random share of each delay.")
    timeout_s: float | None = Field(None, gt=0, description="Per-attempt timeout.")
    on_error: ErrorPolicy = Field(
        "fail",
        description="fail the run, skip this node and what depends only on it, use "
        "`fallback` as the output, or run `handler` on the error and use its output.",
    )
    fallback: Any = Field(None, description="The output when on_error is fallback.")
    handler: Any = Field(
        None,
        description="With on_error: handler, the node run on the error ($error: type, "
        "message, node, attempt); its output replaces the failed node's.",
    )
    catch: list[str] | None = Field(
        None,
        description="Error types (class names, e.g. NodeTimeout, ToolError) that on_error "
        "applies to; others fail the run. Default: every error.",
    )
    concurrency: int | None = Field(None, ge=1, description="At most this many instances at once.")
    cache: CacheOptions | bool | None = Field(
        None,
        description="Reuse this node's output for the same inputs: {ttl_s, key}, or true "
        "(no expiry, every input).",
    )

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> NodeOptions:
        """Options given as keyword arguments of an SDK node method. An unknown name is a
        `TypeError` at once (it is a mistake in the call itself, as an unexpected keyword
        argument is); values are kept as given, for `compile_graph` to check."""
        for name in options:
            if name not in cls.model_fields:
                close = difflib.get_close_matches(name, cls.model_fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                valid = ", ".join(cls.model_fields)
                raise TypeError(f"unknown node option {name!r}{hint}; valid options: {valid}")
        handler = options.get("handler")
        if isinstance(handler, NodeSpec) and not handler.id:
            handler.id = "on_error"
        cache = options.get("cache")
        if cache is True or isinstance(cache, Mapping):
            # a bad one is kept as given: `compile_graph` reports it with the other problems
            with contextlib.suppress(ValidationError):
                options = {**options, "cache": _cache_options(cache)}
        return cls.model_construct(**options)

    @field_validator("cache")
    @classmethod
    def _cache_true(cls, value: Any) -> Any:
        # `cache: true` is the default cache, as the SDK's `cache=True` is
        return _cache_options(value) if value is True else value or None

    def problems(self) -> list[tuple[str, str]]:
        """(option, what is wrong) for every value that does not fit its option."""
        problems: list[tuple[str, str]] = []
        try:
            type(self).model_validate(dict(self))
        except ValidationError as exc:
            problems = [(str(err["loc"][0]), _option_problem(err)) for err in exc.errors()]
        if (self.on_error == "handler") != (self.handler is not None):
            problems.append(("handler", "on_error: handler and a `handler` node go together"))
        return problems

    @property
    def cache_options(self) -> CacheOptions | None:
        """`cache` as `CacheOptions` (None: not cached); ValueError if it is not valid."""
        raw = self.cache
        if raw is None or raw is False or isinstance(raw, CacheOptions):
            return raw or None
        return _cache_options(raw)


def _cache_options(raw: Any) -> CacheOptions:
    return CacheOptions.model_validate({} if raw is True else raw, strict=False)


def _option_problem(err: Any) -> str:
    name, ctx = err["loc"][0], err.get("ctx", {})
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if err["type"] in bounds:
        op, key = bounds[err["type"]]
        return f"{name} must be {op} {ctx[key]:g}"
    if err["type"] == "literal_error":
        return f"{name} must be one of {ctx['expected']}"
    return f"{name}: {err['msg']}"


@dataclass
class NodeSpec:
    """Fields every node kind has. `inputs` maps an input name to a `Ref`, `FirstOf` or a
    literal value. The kinds themselves (`FuncNode`, `LLMNode`, ...) are defined, one module
    each, in `treadle.graphs.kinds`."""

    id: str
    inputs: dict[str, Any] = field(default_factory=dict)
    options: NodeOptions = field(default_factory=NodeOptions)
    source: SourceInfo | None = field(default=None, compare=False, repr=False)

    #: the kind's name in workflow files and events ("llm", "map", ...)
    kind: ClassVar[str]


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
