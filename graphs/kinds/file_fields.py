"""What a node kind's workflow-file fields are made of: string shapes with their meaning,
the strict base model, and the fields every node has (id, inputs, options).

A kind declares its own fields as a `FileFields` model; `treadle.graphs.files.schema`
combines them with the common ones into the node models of the file format. Fields whose
value names a Python object (an import path, a tool, a type) carry the `NAMES_OBJECT`
mark, which the daemon's import allow-list reads (`names_objects`) to know what to check.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from treadle.graphs.spec import NodeOptions

if TYPE_CHECKING:  # the file format's union of inner nodes, resolved by its module
    from typing import Any as InnerNode


class _Mark:
    """A marker in a field's `Annotated` metadata (pydantic ignores it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: the field's value names a Python object: an import path, a tool, or a type
NAMES_OBJECT = _Mark("NAMES_OBJECT")
#: the field holds another node (a map's inner node)
NESTED_NODE = _Mark("NESTED_NODE")
#: the field holds another workflow (a subgraph, inline or by file)
NESTED_GRAPH = _Mark("NESTED_GRAPH")

# -- string shapes ---------------------------------------------------------------------
# Each pattern has a human description; the loader uses it to explain a mismatch.

IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
NODE_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
IMPORT_PATH_PATTERN = rf"^{_DOTTED}:{_DOTTED}$"
TOOL_REF_PATTERN = rf"^(?:[A-Za-z_][A-Za-z0-9_\-]*|{_DOTTED}:{_DOTTED})$"

PATTERN_MEANING: dict[str, str] = {
    IDENT_PATTERN: "an identifier (letters, digits and _, not starting with a digit)",
    NODE_ID_PATTERN: "a node id (letters, digits, _ and -, not starting with a digit or -)",
    IMPORT_PATH_PATTERN: "an import path like 'package.module:name'",
    TOOL_REF_PATTERN: "a built-in tool name or an import path like 'package.module:my_tool'",
}

Ident = Annotated[str, Field(pattern=IDENT_PATTERN)]
NodeId = Annotated[str, Field(pattern=NODE_ID_PATTERN)]
ImportPath = Annotated[
    str,
    Field(
        pattern=IMPORT_PATH_PATTERN,
        description="A Python object as 'package.module:attribute'.",
        examples=["mypkg.steps:format_answer"],
    ),
    NAMES_OBJECT,
]
ToolRef = Annotated[
    str,
    Field(
        pattern=TOOL_REF_PATTERN,
        description="A built-in tool name (calculator, http_fetch, read_file) or an import "
        "path 'package.module:tool' to an object made with @tool.",
        examples=["calculator", "mypkg.tools:search_docs"],
    ),
    NAMES_OBJECT,
]
TypeString = Annotated[
    str,
    Field(
        min_length=1,
        description="A type in Python syntax: str, int, float, bool, bytes, Any, None, "
        "list[T], dict[K, V], tuple[...], set[T], T | None, Optional[T], "
        "Literal['a', 'b'], datetime, date, UUID, a name from `types:`, or an import path "
        "'package.module:Model'.",
        examples=["str", "list[str]", "Literal['yes', 'no'] | None", "mypkg.models:Report"],
    ),
    NAMES_OBJECT,
]
ValueOrRef = Annotated[
    Any,
    Field(
        description="A reference ('$node', '$node.field', '$input.name', '$item', "
        "'$item.field', '$index' inside a map, '$error' inside an on_error handler), "
        "{first_of: [references]}, or a literal value ('$$' starts a literal string with "
        "'$')."
    ),
]


class FileModel(BaseModel):
    """Strict (no "2" -> 2 coercion) and closed (unknown keys are errors): a workflow file
    is written by hand, and a silently ignored typo is the worst outcome."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class FileFields(FileModel):
    """A kind's own fields in a workflow file (`kind` included, `id` and the rest not)."""


# -- the fields every node has ---------------------------------------------------------


class OptionFields(FileModel, NodeOptions):
    """Retry, timeout, error and cache options, written flat on the node."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    # `InnerNode`: every kind's inner file model (treadle.graphs.files.schema resolves it)
    handler: InnerNode | None = Field(
        None,
        description="With on_error: handler, the node run on the error; it may read $error "
        "({type, message, node, attempt}) and its output replaces the failed node's.",
    )


OPTION_FIELDS: tuple[str, ...] = tuple(NodeOptions.model_fields)


class TopId(FileModel):
    id: NodeId = Field(description="Unique within the graph; other nodes refer to $id.")


class InnerId(FileModel):
    id: NodeId | None = Field(None, description="Defaults to the id of the map node.")


class InputFields(FileModel):
    inputs: dict[Ident, ValueOrRef] = Field(
        default_factory=dict, description="Input name -> reference or literal value."
    )


def field_marks(model: type[BaseModel]) -> dict[str, set[_Mark]]:
    """The marks each field of `model` carries (inside lists and unions too)."""
    return {
        name: _marks_of(info.annotation) | {m for m in info.metadata if isinstance(m, _Mark)}
        for name, info in model.model_fields.items()
    }


def _marks_of(tp: Any) -> set[_Mark]:
    found = set()
    if typing.get_origin(tp) is Annotated:
        found |= {m for m in typing.get_args(tp)[1:] if isinstance(m, _Mark)}
    for arg in typing.get_args(tp):
        if not isinstance(arg, _Mark):
            found |= _marks_of(arg)
    return found
