"""`@tool`: a typed Python function (sync or async) turned into a callable, described tool.

A `Tool` knows its OpenAI-format JSON Schema (from the signature and the docstring),
validates arguments before the call, enforces its timeout and concurrency limit, and
records every call's duration so the runtime can predict how long it takes.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints, overload

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from treadle.errors import ToolError

#: a tool function may take this keyword; it is filled by the runtime, not the model
IDEMPOTENCY_PARAM = "idempotency_key"

_log = logging.getLogger(__name__)


class ToolArgumentError(ToolError):
    """The arguments did not match the tool's schema; nothing was called."""


class ToolTimeout(ToolError):
    """The tool did not return within its timeout."""


@dataclass
class ToolStats:
    """Durations of a tool's recent calls, in seconds (the newest last)."""

    calls: int = 0
    failures: int = 0
    total_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def record(self, duration_s: float, ok: bool) -> None:
        self.calls += 1
        self.total_s += duration_s
        self.recent.append(duration_s)
        if not ok:
            self.failures += 1

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.calls if self.calls else None


DurationObserver = Callable[[str, float, bool], None]


class Tool:
    """A described, validated, limited callable. Build one with `@tool`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = 60.0,
        expected_duration_s: float | None = None,
        idempotent: bool = True,
        max_concurrency: int | None = None,
    ) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", ""))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}", self.name):
            raise ValueError(f"tool name {self.name!r} is not a valid function name")
        if timeout_s is not None and not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"tool {self.name!r}: timeout_s must be a positive number or None")
        if expected_duration_s is not None and not expected_duration_s >= 0:
            raise ValueError(f"tool {self.name!r}: expected_duration_s must be >= 0 or None")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"tool {self.name!r}: max_concurrency must be >= 1 or None")
        summary, param_docs = _parse_docstring(inspect.getdoc(fn) or "")
        self.description = description or summary or self.name
        self.timeout_s = timeout_s
        self.expected_duration_s = expected_duration_s
        self.idempotent = idempotent
        self.max_concurrency = max_concurrency
        self.is_async = inspect.iscoroutinefunction(fn)
        self.stats = ToolStats()
        self._observers: list[DurationObserver] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._schema_cache: tuple[type[BaseModel], dict[str, Any]] | None = None
        hints = _type_hints(fn, self.name)
        self.input_model, self.takes_idempotency_key = _input_model(
            fn, self.name, hints, param_docs
        )
        self.output_type: Any = hints.get("return", Any)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    # -- description -------------------------------------------------------------------

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """JSON Schema of the arguments, without pydantic's auto-generated `title`s.

        The titles ("Max Bytes" for `max_bytes`) tell a model nothing the names do not,
        and every schema token is paid for in every prompt that carries the tool.
        """
        # cached per input model: building it costs ~0.3 ms and prompts carry it on every call
        cached = self._schema_cache
        if cached is None or cached[0] is not self.input_model:
            cached = (self.input_model, _strip_titles(self.input_model.model_json_schema()))
            self._schema_cache = cached
        return cached[1]

    def openai_schema(self) -> dict[str, Any]:
        """The tool in the OpenAI `tools=[...]` format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters_schema,
            },
        }

    # -- calling -----------------------------------------------------------------------

    def validate(self, arguments: dict[str, Any] | str | None) -> BaseModel:
        """Parse and check arguments (a dict or JSON text) against the schema."""
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ToolArgumentError(self.name, f"arguments are not valid JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise ToolArgumentError(self.name, "arguments must be a JSON object")
        try:
            return self.input_model.model_validate(arguments)
        except ValidationError as exc:
            raise ToolArgumentError(self.name, _describe_validation(exc)) from None

    def add_observer(self, observer: DurationObserver) -> None:
        """Call `observer(tool_name, duration_s, ok)` after every call."""
        if observer not in self._observers:
            self._observers.append(observer)

    def remove_observer(self, observer: DurationObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    async def invoke(
        self,
        arguments: dict[str, Any] | str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Any:
        """Validate, then run the tool under its concurrency limit and timeout."""
        parsed = self.validate(arguments)
        kwargs = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        if self.takes_idempotency_key:
            kwargs[IDEMPOTENCY_PARAM] = idempotency_key
        if self.max_concurrency is not None:
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(self.max_concurrency)
            async with self._limiter:
                return await self._timed(kwargs)
        return await self._timed(kwargs)

    async def _timed(self, kwargs: dict[str, Any]) -> Any:
        # The timeout covers the call itself, not the wait for a concurrency slot: a tool
        # that is merely queued behind its limit has not been slow.
        start = time.perf_counter()
        ok = False
        try:
            # `move_on_after` rather than `fail_after`: a TimeoutError raised *by the tool*
            # (a socket timeout, say) is the tool's own failure, not our deadline.
            with anyio.move_on_after(self.timeout_s) as scope:
                if self.is_async:
                    result = await self.fn(**kwargs)
                else:
                    # A thread cannot be killed; on timeout we stop waiting for it
                    # (abandon) so the deadline holds, and the thread ends on its own.
                    result = await anyio.to_thread.run_sync(
                        lambda: self.fn(**kwargs), abandon_on_cancel=True
                    )
            if scope.cancelled_caught:
                raise ToolTimeout(self.name, f"timed out after {self.timeout_s:g} s")
            ok = True
            return result
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(self.name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            elapsed = time.perf_counter() - start
            self.stats.record(elapsed, ok)
            for observer in list(self._observers):
                try:
                    observer(self.name, elapsed, ok)
                except Exception:
                    # A broken metrics hook must not turn a good tool result into a
                    # failure (or hide the real error); it is logged, not swallowed.
                    _log.exception("duration observer %r failed for tool %r", observer, self.name)

    async def __call__(self, **kwargs: Any) -> Any:
        return await self.invoke(kwargs)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = 60.0,
    expected_duration_s: float | None = None,
    idempotent: bool = True,
    max_concurrency: int | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = 60.0,
    expected_duration_s: float | None = None,
    idempotent: bool = True,
    max_concurrency: int | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn a typed function into a `Tool`; usable bare (`@tool`) or with options."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(
            f,
            name=name,
            description=description,
            timeout_s=timeout_s,
            expected_duration_s=expected_duration_s,
            idempotent=idempotent,
            max_concurrency=max_concurrency,
        )

    return wrap(fn) if fn is not None else wrap


# -- helpers ---------------------------------------------------------------------------


_ARG_SECTIONS = {
    "args",
    "arguments",
    "parameters",
    "params",
    "keyword args",
    "keyword arguments",
    "other parameters",
}
_OTHER_SECTIONS = {
    "returns",
    "return",
    "raises",
    "yields",
    "yield",
    "example",
    "examples",
    "note",
    "notes",
    "see also",
    "warning",
    "warnings",
    "attributes",
    "todo",
    "references",
}
_PARAM_LINE = re.compile(r"(\*{0,2}\w+)(?:\s*\([^)]*\))?\s*:(?:\s+(.*))?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its description and per-parameter descriptions.

    The description is the text before the first section (paragraphs kept apart by a blank
    line); in an `Args:` section a parameter starts at the section's item indentation and
    deeper-indented lines continue it, so `default: 5` on a continuation line stays text.
    """
    paragraphs: list[list[str]] = [[]]
    params: dict[str, str] = {}
    section: str | None = None  # None: description; "args"; "other"
    header_indent = 0
    item_indent: int | None = None
    current: str | None = None
    for raw in doc.expandtabs().splitlines():
        text = raw.strip()
        header = text[:-1].strip().lower() if text.endswith(":") else None
        if header in _ARG_SECTIONS or header in _OTHER_SECTIONS:
            section = "args" if header in _ARG_SECTIONS else "other"
            header_indent, item_indent, current = _indent(raw), None, None
            continue
        if section is None:
            if text:
                paragraphs[-1].append(text)
            elif paragraphs[-1]:
                paragraphs.append([])
            continue
        if not text:
            continue
        if _indent(raw) <= header_indent:
            # dedented prose after a section: the section is over
            section, current = "other", None
            continue
        if section != "args":
            continue
        if item_indent is None:
            item_indent = _indent(raw)
        match = _PARAM_LINE.fullmatch(text) if _indent(raw) == item_indent else None
        if match:
            current = match.group(1).lstrip("*")
            params[current] = (match.group(2) or "").strip()
        elif current is not None:
            params[current] = f"{params[current]} {text}".strip()
    description = "\n\n".join(" ".join(p) for p in paragraphs if p)
    return description, params


def _type_hints(fn: Callable[..., Any], name: str) -> dict[str, Any]:
    # include_extras keeps `Annotated[int, Field(ge=1)]` constraints in the schema
    try:
        return get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise TypeError(
            f"tool {name!r}: cannot resolve the type annotations of {fn!r} ({exc}); "
            "define the types it uses at module level"
        ) from exc


def _input_model(
    fn: Callable[..., Any], name: str, hints: dict[str, Any], param_docs: dict[str, str]
) -> tuple[type[BaseModel], bool]:
    sig = inspect.signature(fn)
    fields: dict[str, Any] = {}
    takes_key = False
    for pname, param in sig.parameters.items():
        if pname == IDEMPOTENCY_PARAM:
            takes_key = True
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args/**kwargs cannot be described to a model")
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(f"tool {name!r}: positional-only parameter {pname!r} cannot be named")
        if pname.startswith("_"):
            raise TypeError(f"tool {name!r}: parameter {pname!r} starts with '_' (private)")
        annotation = hints.get(pname, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, Field(default, description=param_docs.get(pname)))
    with warnings.catch_warnings():
        # a parameter may be called `json` or `schema`; the model is only read by field
        # name, so shadowing a BaseModel method is harmless here
        warnings.filterwarnings("ignore", message=r"Field name .* shadows an attribute")
        model = create_model(
            f"{name}_args",
            __config__=ConfigDict(extra="forbid", protected_namespaces=()),
            **fields,
        )
    return model, takes_key


#: keys whose value maps *names* (of properties or definitions) to schemas
_NAME_MAPS = {"properties", "$defs", "definitions", "patternProperties"}
#: keys whose value is data, not schema, and must be left exactly as is
_DATA_KEYS = {"default", "const", "enum", "examples", "example"}


def _strip_titles(node: Any, names: bool = False) -> Any:
    if isinstance(node, dict):
        if names:
            return {key: _strip_titles(value) for key, value in node.items()}
        return {
            key: value if key in _DATA_KEYS else _strip_titles(value, key in _NAME_MAPS)
            for key, value in node.items()
            if key != "title"
        }
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    return node


def _describe_validation(exc: ValidationError) -> str:
    """One line per problem, worded for a model that has to fix its call."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(arguments)"
        if err["type"] == "missing":
            parts.append(f"{loc}: required, but missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unexpected (not in the schema)")
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            parts.append(f"{loc}: {err['msg']} (got {got})")
    return "invalid arguments: " + "; ".join(parts)
