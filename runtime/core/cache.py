"""The node result cache: where cached outputs live (`ResultCache`) and how a node's key is
made (`node_cache_key`).

A node with the `cache` option (`NodeOptions.cache`: `{ttl_s, key}`) is looked up before
it runs; on a hit the orchestrator takes the cached output, emits `CacheHit`, and nothing
runs (an LLM node spends no tokens). The key is a digest of the tenant, the graph's name,
the node's id and definition (`fingerprint`: for an LLM node its model, prompt, system
prompt, output type and tools), and the values of its inputs (all, or those named in
`key`). The tenant is part of every key, so one tenant's cached outputs never answer
another's.

Every store of treadle is also a `ResultCache` (memory, sqlite, Redis): a runtime caches
in its own store unless given another (`Runtime(cache=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import typing
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import pydantic_core
from pydantic import BaseModel

from treadle.graphs.spec import CacheOptions, GraphSpec, NodeSpec
from treadle.tools import Tool

#: a key's prefix, so a change of how keys are made never reads an old entry
_KEY_VERSION = "1"


@runtime_checkable
class ResultCache(Protocol):
    """Cached outputs by key (JSON bytes); entries expire after their `ttl_s`."""

    async def cache_get(self, key: str) -> bytes | None: ...

    async def cache_put(self, key: str, value: bytes, ttl_s: float | None) -> None: ...


def node_cache_key(
    options: CacheOptions,
    *,
    tenant: str | None,
    graph: str,
    node: str,
    fingerprint: str,
    inputs: Mapping[str, Any],
) -> str:
    """The key of a node's output for these inputs (see the module docstring)."""
    names = options.key if options.key is not None else sorted(inputs)
    chosen = {name: inputs.get(name) for name in names}
    payload = pydantic_core.to_json(
        [_KEY_VERSION, tenant, graph, node, fingerprint, chosen], fallback=repr
    )
    return hashlib.sha256(payload).hexdigest()


def fingerprint(spec: NodeSpec) -> str:
    """What defines a node besides its id, inputs and options, as stable text: its kind's
    fields, with functions, tools, types and nested graphs named rather than printed (a
    function's repr holds its address, which changes from process to process)."""
    fields = {
        f.name: _stable(getattr(spec, f.name))
        for f in dataclasses.fields(spec)
        if f.name not in ("id", "inputs", "options", "source")
    }
    return hashlib.sha256(pydantic_core.to_json([spec.kind, fields], fallback=repr)).hexdigest()


def _stable(value: Any) -> Any:
    if isinstance(value, Tool):
        return f"tool:{value.name}"
    if isinstance(value, GraphSpec):
        return f"graph:{value.name}:" + "".join(fingerprint(n) for n in value.nodes)
    if isinstance(value, NodeSpec):
        return fingerprint(value)
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value.model_json_schema()
    if typing.get_origin(value) is not None:  # list[str], Literal["a"], X | None
        return repr(value)
    if inspect.isclass(value) or callable(value):
        module = getattr(value, "__module__", "?")
        return f"{module}:{getattr(value, '__qualname__', repr(value))}"
    if isinstance(value, tuple | list):
        return [_stable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items()}
    return value
