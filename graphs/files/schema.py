"""The workflow FILE format as pydantic models: plain strings, nothing resolved yet.

These models do two jobs: the loader (`treadle.graphs.files.loader`) validates a parsed YAML or
JSON document against them before it resolves anything, and `workflow_json_schema()`
turns them into the JSON Schema that `treadle schema` prints for editors. Keeping both
jobs on one set of models means the schema can never drift from what the loader accepts.

Validation is strict (no "2" -> 2 coercion) and closed (unknown keys are errors), because
a workflow file is written by hand and a silently ignored typo is the worst outcome.

Unions are discriminated by callables that return `#`-prefixed tags; the loader skips
those tags when it maps a pydantic error location back to a place in the file.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from treadle.graphs.spec import Policy

#: JSON Schema dialect of `workflow_json_schema()` (pydantic emits draft 2020-12)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

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
]
ToolRef = Annotated[
    str,
    Field(
        pattern=TOOL_REF_PATTERN,
        description="A built-in tool name (calculator, http_fetch, read_file) or an import "
        "path 'package.module:tool' to an object made with @tool.",
        examples=["calculator", "mypkg.tools:search_docs"],
    ),
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
]
ValueOrRef = Annotated[
    Any,
    Field(
        description="A reference ('$node', '$node.field', '$input.name', '$item', "
        "'$item.field'), {first_of: [references]}, or a literal value ('$$' starts a "
        "literal string with '$')."
    ),
]


def _shape_tag(value: Any) -> str | None:
    """Tag a text-or-mapping union by the shape of the value (None: neither)."""
    if isinstance(value, str):
        return "#text"
    if isinstance(value, dict | BaseModel):
        return "#mapping"
    return None


#: node kinds a workflow file can declare (every kind of `treadle.graphs.spec`)
FILE_KINDS: tuple[str, ...] = ("func", "tool", "llm", "map", "branch", "subgraph", "planner")


def _node_tag(value: Any) -> str | None:
    """Tag a node by its `kind`; None (an error) when it is missing or unknown."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"#{kind}" if isinstance(kind, str) and kind in FILE_KINDS else None


#: tags the discriminators above can return, so the loader can recognise them in a location
UNION_TAGS = frozenset({"#text", "#mapping"} | {f"#{k}" for k in FILE_KINDS})


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


# -- declarations ----------------------------------------------------------------------


class InputDecl(_Model):
    """A graph input written as a mapping."""

    type: TypeString = "Any"
    default: Any = Field(None, description="Makes the input optional.")
    description: str | None = None


class FieldDecl(_Model):
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

_P = Policy()  # the runtime's defaults, so the schema documents the real ones


class _PolicyFields(_Model):
    """Retry, timeout and error policy, written flat on the node."""

    retries: int = Field(_P.retries, ge=0, description="Attempts after the first failure.")
    backoff_s: float = Field(_P.backoff_s, ge=0, description="First retry delay (seconds).")
    backoff_max_s: float = Field(_P.backoff_max_s, ge=0, description="Largest retry delay.")
    jitter: float = Field(_P.jitter, ge=0, le=1, description="Random share of each delay.")
    timeout_s: float | None = Field(_P.timeout_s, gt=0, description="Per-attempt timeout.")
    on_error: Literal["fail", "skip", "fallback"] = Field(
        _P.on_error,
        description="fail the run, skip this node and what depends only on it, or use "
        "`fallback` as the output.",
    )
    fallback: Any = Field(_P.fallback, description="The output when on_error is fallback.")
    concurrency: int | None = Field(
        _P.concurrency, ge=1, description="At most this many instances at once."
    )


POLICY_FIELDS: tuple[str, ...] = tuple(_PolicyFields.model_fields)


class _TopId(_Model):
    id: NodeId = Field(description="Unique within the graph; other nodes refer to $id.")


class _InnerId(_Model):
    id: NodeId | None = Field(None, description="Defaults to the id of the map node.")


class _Inputs(_Model):
    inputs: dict[Ident, ValueOrRef] = Field(
        default_factory=dict, description="Input name -> reference or literal value."
    )


class _FuncFields(_Model):
    kind: Literal["func"]
    fn: ImportPath = Field(description="The function, as 'package.module:function'.")
    blocking: bool = Field(False, description="Run a sync function in a worker thread.")


class _ToolFields(_Model):
    kind: Literal["tool"]
    tool: ToolRef


class _LLMFields(_Model):
    kind: Literal["llm"]
    prompt: str = Field(description="Template over the inputs: 'Answer {question}'.")
    system: str | None = Field(None, description="System prompt (a template too).")
    model: str = Field("default", min_length=1, description="A model alias.")
    output: TypeString = Field("str", description="str, or the type the answer must parse to.")
    tools: list[ToolRef] = Field(default_factory=list, description="Tools the model may call.")
    max_turns: int = Field(8, ge=1, description="Tool-calling rounds before giving up.")
    temperature: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)


class _PlannerFields(_Model):
    kind: Literal["planner"]
    prompt: str = Field(description="Template over the inputs: what the plan must achieve.")
    system: str | None = Field(None, description="System prompt (a template too).")
    model: str = Field("default", min_length=1, description="A model alias.")
    tools: list[ToolRef] = Field(min_length=1, description="Tools the plan may call.")
    output: TypeString = Field("str", description="str, or the type the answer must parse to.")
    max_replans: int = Field(2, ge=0, description="New plans the joiner may ask for.")
    joiner: str | None = Field(None, description="The joiner's instructions.")


class _MapFields(_Model):
    kind: Literal["map"]
    over: ValueOrRef = Field(description="The list to fan out over, usually a reference.")
    node: InnerNode = Field(description="The node run once per element ($item).")
    reduce: ImportPath | None = Field(None, description="Folds the list of outputs.")


class _BranchFields(_Model):
    kind: Literal["branch"]
    routes: dict[str, list[NodeId]] = Field(
        min_length=1, description="Label -> the nodes that run when it is chosen."
    )
    route: ImportPath | None = Field(
        None, description="route(**inputs) -> label; without it the single input is the label."
    )
    default: str | None = Field(None, description="The label used when none matches.")

    @field_validator("routes", mode="before")
    @classmethod
    def _label_keys(cls, value: Any) -> Any:
        # YAML reads `true:` and `1:` as bool/int keys; labels are strings.
        if isinstance(value, dict):
            return {label_text(k): v for k, v in value.items()}
        return value

    @field_validator("default", mode="before")
    @classmethod
    def _label_default(cls, value: Any) -> Any:
        return label_text(value) if value is not None else value


class _SubgraphFields(_Model):
    kind: Literal["subgraph"]
    graph: GraphRef


def label_text(value: Any) -> Any:
    """A route label as a string, as the SDK's `route_label` makes it: YAML `true` ->
    "true", `1` -> "1" (anything but a bool or number is left for validation to judge)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


# Field order in the schema follows the reversed MRO: id, kind fields, inputs, policy.
class FuncNode(_PolicyFields, _Inputs, _FuncFields, _TopId):
    """Call a Python function."""


class ToolNode(_PolicyFields, _Inputs, _ToolFields, _TopId):
    """Call a tool with bound arguments."""


class LLMNode(_PolicyFields, _Inputs, _LLMFields, _TopId):
    """A chat call (optionally with tools)."""


class PlannerNode(_PolicyFields, _Inputs, _PlannerFields, _TopId):
    """An LLM that plans tool calls, run as they stream in, then joins the results."""


class MapNode(_PolicyFields, _MapFields, _TopId):
    """Run a node once per element of a list (a map reads only `over`; the inner node has
    the inputs)."""


class BranchNode(_PolicyFields, _Inputs, _BranchFields, _TopId):
    """Choose which nodes run."""


class SubgraphNode(_PolicyFields, _Inputs, _SubgraphFields, _TopId):
    """Another workflow used as one node."""


class InnerFuncNode(_PolicyFields, _Inputs, _FuncFields, _InnerId):
    """Call a Python function (inside a map)."""


class InnerToolNode(_PolicyFields, _Inputs, _ToolFields, _InnerId):
    """Call a tool (inside a map)."""


class InnerLLMNode(_PolicyFields, _Inputs, _LLMFields, _InnerId):
    """A chat call (inside a map)."""


class InnerPlannerNode(_PolicyFields, _Inputs, _PlannerFields, _InnerId):
    """A planner (inside a map)."""


class InnerMapNode(_PolicyFields, _MapFields, _InnerId):
    """A nested map (inside a map)."""


class InnerBranchNode(_PolicyFields, _Inputs, _BranchFields, _InnerId):
    """A branch (inside a map)."""


class InnerSubgraphNode(_PolicyFields, _Inputs, _SubgraphFields, _InnerId):
    """A subgraph (inside a map)."""


_KIND_MESSAGE = "a node needs `kind`: one of " + ", ".join(FILE_KINDS)

Node = Annotated[
    (
        Annotated[FuncNode, Tag("#func")]
        | Annotated[ToolNode, Tag("#tool")]
        | Annotated[LLMNode, Tag("#llm")]
        | Annotated[MapNode, Tag("#map")]
        | Annotated[BranchNode, Tag("#branch")]
        | Annotated[SubgraphNode, Tag("#subgraph")]
        | Annotated[PlannerNode, Tag("#planner")]
    ),
    Discriminator(_node_tag, custom_error_type="node_kind", custom_error_message=_KIND_MESSAGE),
]
InnerNode = Annotated[
    (
        Annotated[InnerFuncNode, Tag("#func")]
        | Annotated[InnerToolNode, Tag("#tool")]
        | Annotated[InnerLLMNode, Tag("#llm")]
        | Annotated[InnerMapNode, Tag("#map")]
        | Annotated[InnerBranchNode, Tag("#branch")]
        | Annotated[InnerSubgraphNode, Tag("#subgraph")]
        | Annotated[InnerPlannerNode, Tag("#planner")]
    ),
    Discriminator(_node_tag, custom_error_type="node_kind", custom_error_message=_KIND_MESSAGE),
]

AnyNode = FuncNode | ToolNode | LLMNode | MapNode | BranchNode | SubgraphNode | PlannerNode
AnyInnerNode = (
    InnerFuncNode
    | InnerToolNode
    | InnerLLMNode
    | InnerMapNode
    | InnerBranchNode
    | InnerSubgraphNode
    | InnerPlannerNode
)

# -- the document ----------------------------------------------------------------------


class Workflow(_Model):
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
]

for _model in (
    *typing.get_args(AnyNode),
    *typing.get_args(AnyInnerNode),
    Workflow,
    InlineWorkflow,
):
    _model.model_rebuild()


def workflow_json_schema() -> dict[str, Any]:
    """The JSON Schema of workflow files (what `treadle schema` prints)."""
    schema = Workflow.model_json_schema(by_alias=True)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "treadle workflow",
        **{k: v for k, v in schema.items() if k != "title"},
    }
