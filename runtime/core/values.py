"""Values flowing along edges: binding resolution, JSON codecs, prompt rendering.

Outputs are checkpointed as JSON through a pydantic `TypeAdapter` of the node's declared
output type, so they come back from a store as the same types they left as.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from treadle.graphs.spec import ERROR, INDEX, INPUT, ITEM, FirstOf, Ref

MISSING: Any = object()


@lru_cache(maxsize=1024)
def _adapter_cached(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def adapter(tp: Any) -> TypeAdapter[Any]:
    try:
        return _adapter_cached(tp)
    except TypeError:  # unhashable annotation
        return TypeAdapter(tp)


def dump_value(tp: Any, value: Any) -> bytes:
    """JSON bytes of `value` as type `tp`; raises ValueError when it cannot be serialized."""
    try:
        return adapter(tp).dump_json(value, warnings="error")
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        # a value of another type than declared: serialize it as what it is, if possible
        try:
            return adapter(type(value)).dump_json(value)
        except Exception:
            raise ValueError(
                f"output of type {type(value).__name__} cannot be serialized: {exc}"
            ) from None


def load_value(tp: Any, data: bytes) -> Any:
    try:
        return adapter(tp).validate_json(data)
    except ValidationError:
        return json.loads(data)


def get_path(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


Getter = Callable[[dict[str, Any], dict[str, Any], Any], Any]


def make_getter(binding: Any) -> tuple[Getter, tuple[str, ...]]:
    """A fast function `(values, graph_inputs, item) -> value` for a binding, plus the
    node ids it reads (for FirstOf, in order of preference)."""
    if isinstance(binding, Ref):
        node, path = binding.node, binding.path
        if node == INPUT:
            return (lambda values, inputs, item: get_path(inputs, path)), ()
        if node == ITEM:
            return (lambda values, inputs, item: get_path(item, path)), ()
        if node in (INDEX, ERROR):
            # bound by the scope in a copy of its inputs: a map element's index, the error
            # an `on_error` handler handles
            return (lambda values, inputs, item: get_path(inputs[node], path)), ()
        if not path:
            return (lambda values, inputs, item: values[node]), (node,)
        return (lambda values, inputs, item: get_path(values[node], path)), (node,)
    if isinstance(binding, FirstOf):
        getters = [make_getter(r) for r in binding.refs]

        def first(values: dict[str, Any], inputs: dict[str, Any], item: Any) -> Any:
            for get, nodes in getters:
                if not nodes or nodes[0] in values:
                    return get(values, inputs, item)
            raise KeyError("first_of: no reference is available")

        return first, tuple(n for _, ns in getters for n in ns)
    return (lambda values, inputs, item: binding), ()


def as_text(value: Any) -> str:
    """How a value appears inside a prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(adapter(type(value)).dump_python(value, mode="json"))
    except Exception:
        return str(value)
