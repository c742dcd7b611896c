"""Types along edges: what a reference's type is, and whether it fits where it is bound.

The check is deliberately permissive where Python's typing is (Any, unannotated, numeric
widening) and strict where a mismatch is certainly a bug (str into int, a model into a
list).
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

_NUMERIC_WIDENING = {(int, float), (bool, int), (bool, float), (int, complex), (float, complex)}


def field_type(tp: Any, name: str) -> Any:
    """The type of attribute/key `name` inside a value of type `tp` (`None`: no such field)."""
    tp = _strip_optional(tp)
    if tp is Any or tp is object:
        return Any
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(name)
        return field.annotation if field is not None else None
    origin = get_origin(tp)
    if origin in (dict, typing.Mapping) or tp is dict:
        args = get_args(tp)
        return args[1] if len(args) == 2 else Any
    if typing.is_typeddict(tp):
        return typing.get_type_hints(tp).get(name)
    if inspect.isclass(tp) and hasattr(tp, "__dataclass_fields__"):
        hints = typing.get_type_hints(tp)
        return hints.get(name)
    return None


def element_type(tp: Any) -> Any:
    """The element type of a sequence type (`None`: not a sequence)."""
    tp = _strip_optional(tp)
    if tp is Any:
        return Any
    origin = get_origin(tp)
    if origin in (list, set, frozenset, typing.Sequence, typing.Iterable):
        args = get_args(tp)
        return args[0] if args else Any
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return Union[args] if args else Any  # noqa: UP007 - built from a runtime tuple
    if tp in (list, tuple, set):
        return Any
    return None


def is_compatible(src: Any, dst: Any) -> bool:
    """Can a value of type `src` be bound to an input annotated `dst`?"""
    if src is Any or dst is Any or src is dst or dst is object:
        return True
    if src == dst:
        return True
    if _is_union(dst):
        dst_args = get_args(dst)
        if _is_union(src):
            return all(any(is_compatible(s, d) for d in dst_args) for s in get_args(src))
        return any(is_compatible(src, d) for d in dst_args)
    if _is_union(src):
        # an Optional[X] source fits an X input only if X fits; None would fail at run time,
        # which is what pydantic validation reports then
        args = [a for a in get_args(src) if a is not type(None)]
        return all(is_compatible(a, dst) for a in args)
    if get_origin(src) is Literal:
        return all(is_compatible(type(v), dst) for v in get_args(src))
    if get_origin(dst) is Literal:
        return get_origin(src) is Literal and set(get_args(src)) <= set(get_args(dst))
    if (src, dst) in _NUMERIC_WIDENING:
        return True
    s_origin, d_origin = get_origin(src) or src, get_origin(dst) or dst
    if inspect.isclass(s_origin) and inspect.isclass(d_origin):
        if s_origin in (list, tuple, set, frozenset) and d_origin in (
            list,
            tuple,
            set,
            frozenset,
            typing.Sequence,
            typing.Iterable,
        ):
            se, de = element_type(src), element_type(dst)
            return se is None or de is None or is_compatible(se, de)
        if s_origin is dict and d_origin in (dict, typing.Mapping):
            sa, da = get_args(src), get_args(dst)
            if len(sa) == 2 and len(da) == 2:
                return is_compatible(sa[0], da[0]) and is_compatible(sa[1], da[1])
            return True
        try:
            if issubclass(s_origin, d_origin):
                return True
        except TypeError:
            return True
        # pydantic coerces a dict into a model and a model into a dict
        model_to_dict = _is_model(s_origin) and d_origin is dict
        return model_to_dict or (s_origin is dict and _is_model(d_origin))
    # typing constructs we do not model (TypeVar, Callable, Annotated...) are not errors
    return True


def type_hints(fn: Any) -> dict[str, Any]:
    """The annotations of a function (or of a callable object's `__call__`); {} if none can
    be read."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        # a callable object: its __call__ carries the annotations
        target = type(fn).__call__ if not inspect.isroutine(fn) and callable(fn) else None
        try:
            return typing.get_type_hints(target) if target is not None else {}
        except Exception:
            return {}


def describe(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if inspect.isclass(tp) and get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp
