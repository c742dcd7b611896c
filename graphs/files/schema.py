"""The workflow FILE format as pydantic models: plain strings, nothing resolved yet.

These models do two jobs: the loader (`treadle.graphs.files.loader`) validates a parsed YAML or
JSON document against them before it resolves anything, and `workflow_json_schema()`
turns them into the JSON Schema that `treadle schema` prints for editors. Keeping both
jobs on one set of models means the schema can never drift from what the loader accepts.

A node's model is made here from its kind's own fields (`NodeKind.fields`, in
`treadle.graphs.kinds`) and the fields every node has (`id`, `inputs`, the options): one
model for a node at the top level (`LLMNode`, id required) and one inside a map
(`InnerLLMNode`, id optional).

Validation is strict (no "2" -> 2 coercion) and closed (unknown keys are errors), because
a workflow file is written by hand and a silently ignored typo is the worst outcome.

Unions are discriminated by callables that return `#`-prefixed tags; the loader skips
those tags when it maps a pydantic error location back to a place in the file.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Field, Tag

from treadle.graphs.kinds import KINDS
from treadle.graphs.kinds.base import NodeKind
from treadle.graphs.kinds.file_fields import (
    NESTED_GRAPH,
    NESTED_NODE,
    NODE_ID_PATTERN,
    OPTION_FIELDS,
    PATTERN_MEANING,
    FileModel,
    Ident,
    InnerId,
    InputFields,
    OptionFields,
    TopId,
    TypeString,
    ValueOrRef,
)

__all__ = [
    "FILE_KINDS",
    "JSON_SCHEMA_DIALECT",
    "NODE_ID_PATTERN",
    "OPTION_FIELDS",
    "PATTERN_MEANING",
    "UNION_TAGS",
    "FieldDecl",
    "InlineWorkflow",
    "InputDecl",
    "Workflow",
    "workflow_json_schema",
]

#: JSON Schema dialect of `workflow_json_schema()` (pydantic emits draft 2020-12)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _shape_tag(value: Any) -> str | None:
    """Tag a text-or-mapping union by the shape of the value (None: neither)."""
    if isinstance(value, str):
        return "#text"
    if isinstance(value, dict | BaseModel):
        return "#mapping"
    return None


#: node kinds a workflow file can declare (every kind of `treadle.graphs.kinds`)
FILE_KINDS: tuple[str, ...] = tuple(kind.name for kind in KINDS)


def _node_tag(value: Any) -> str | None:
    """Tag a node by its `kind`; None (an error) when it is missing or unknown."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"#{kind}" if isinstance(kind, str) and kind in FILE_KINDS else None


#: tags the discriminators above can return, so the loader can recognise them in a location
UNION_TAGS = frozenset({"#text", "#mapping"} | {f"#{k}" for k in FILE_KINDS})


# -- declarations ----------------------------------------------------------------------


class InputDecl(FileModel):
    """A graph input written as a mapping."""

    type: TypeString = "Any"
    default: Any = Field(None, description="Makes the input optional.")
    description: str | None = None


class FieldDecl(FileModel):
    """A field of an inline type written as a mapping."""

    type: TypeString
    description: str | None = Field(None, description="Shown to the model in the schema.")
    default: Any = Field(None, description="Makes the field optional.")


InputType = Annotated[
    Annotated[TypeString, Tag("#text")] | Annotated[InputDecl, Tag("#mapping")],
    Discriminator(
        _shape_tag,
        custom_error_type="input_decl",
        custom_error_message="expected a type string or a mapping {type: ..., default: ...}",
    ),
]
FieldType = Annotated[
    Annotated[TypeString, Tag("#text")] | Annotated[FieldDecl, Tag("#mapping")],
    Discriminator(
        _shape_tag,
        custom_error_type="field_decl",
        custom_error_message="expected a type string or a mapping "
        "{type: ..., description: ..., default: ...}",
    ),
]

# -- nodes -----------------------------------------------------------------------------


def _node_model(kind: NodeKind[Any], *, inner: bool) -> type[BaseModel]:
    # Field order in the schema follows the reversed MRO: id, kind fields, inputs, options.
    bases: tuple[type[BaseModel], ...] = (
        OptionFields,
        *((InputFields,) if kind.has_inputs else ()),
        kind.fields,
        InnerId if inner else TopId,
    )
    name = ("Inner" if inner else "") + kind.spec.__name__
    doc = kind.inner_file_doc if inner else kind.file_doc
    return type(name, bases, {"__doc__": doc, "__module__": __name__})


#: kind name -> its file model at the top level, and inside a map
NODE_MODELS: dict[str, type[BaseModel]] = {k.name: _node_model(k, inner=False) for k in KINDS}
INNER_NODE_MODELS: dict[str, type[BaseModel]] = {k.name: _node_model(k, inner=True) for k in KINDS}

_KIND_MESSAGE = "a node needs `kind`: one of " + ", ".join(FILE_KINDS)


def _node_union(models: dict[str, type[BaseModel]], mark: Any = None) -> Any:
    tagged = tuple(Annotated[model, Tag(f"#{name}")] for name, model in models.items())
    discriminator = Discriminator(
        _node_tag, custom_error_type="node_kind", custom_error_message=_KIND_MESSAGE
    )
    if mark is None:
        return Annotated[Union[tagged], discriminator]  # noqa: UP007 - built at run time
    return Annotated[Union[tagged], discriminator, mark]  # noqa: UP007


Node: Any = _node_union(NODE_MODELS)
InnerNode: Any = _node_union(INNER_NODE_MODELS, NESTED_NODE)

# -- the document ----------------------------------------------------------------------


class Workflow(FileModel):
    """A treadle workflow: typed inputs, nodes, outputs and model aliases."""

    schema_ref: str | None = Field(
        None, alias="$schema", description="The JSON Schema of this format (for editors)."
    )
    name: str = Field(min_length=1)
    description: str = ""
    inputs: dict[Ident, InputType] = Field(
        default_factory=dict, description="Input name -> type string or {type, default}."
    )
    types: dict[Ident, dict[Ident, FieldType]] = Field(
        default_factory=dict,
        description="Inline pydantic models: type name -> {field: type string or "
        "{type, description, default}}.",
    )
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Model alias -> backend configuration ({backend: ..., ...}).",
    )
    outputs: dict[Ident, ValueOrRef] = Field(
        default_factory=dict, description="Output name -> reference."
    )
    nodes: list[Node] = Field(default_factory=list)


class InlineWorkflow(Workflow):
    """A workflow written inline as a subgraph; its name defaults to the node id."""

    name: str | None = Field(None, min_length=1)  # type: ignore[assignment]


GraphRef = Annotated[
    (
        Annotated[
            str,
            Tag("#text"),
            Field(min_length=1, description="A workflow file, relative to this file."),
        ]
        | Annotated[InlineWorkflow, Tag("#mapping")]
    ),
    Discriminator(
        _shape_tag,
        custom_error_type="graph_ref",
        custom_error_message="expected a file path or an inline workflow mapping",
    ),
    NESTED_GRAPH,
]

# the kinds' fields refer to these two by name (a map's `node`, a subgraph's `graph`)
_NAMESPACE = {"InnerNode": InnerNode, "GraphRef": GraphRef}
_REBUILT: list[type[BaseModel]] = [
    OptionFields,
    *(k.fields for k in KINDS),
    *NODE_MODELS.values(),
    *INNER_NODE_MODELS.values(),
    Workflow,
    InlineWorkflow,
]
for _model in _REBUILT:
    _model.model_rebuild(_types_namespace=_NAMESPACE)


def workflow_json_schema() -> dict[str, Any]:
    """The JSON Schema of workflow files (what `treadle schema` prints)."""
    schema = Workflow.model_json_schema(by_alias=True)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "treadle workflow",
        **{k: v for k, v in schema.items() if k != "title"},
    }
