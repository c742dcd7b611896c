"""Build a `Backend` from a workflow file's `models:` entry.

```yaml
models:
  fast:    {backend: scripted, rules: [...], latency_s: 0.05}
  local:   {backend: openai_compat, base_url: "http://gpu1:8000/v1",
            model: meta-llama/Llama-3.1-8B-Instruct, dialect: vllm,
            dialect_options: {priority_scheduling: true}, api_key_env: VLLM_KEY}
  remote:  {backend: litellm, model: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}
  sim:     {backend: sim, ...}            # treadle.backends.sim.backend.SimBackend options
  cluster: {backend: pool, policy: treadle, replicas: [{backend: openai_compat, ...}, ...]}
```

Each kind has a pydantic model that forbids unknown fields, so a typo is a `ValueError`
naming the field. `sim` and `pool` are imported only when used; their options are checked
against the constructor they go to. Secrets are read from the environment (`api_key_env`),
never required in the file.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from treadle.backends.base import Backend
from treadle.backends.openai_compat.dialects import LlamaCppDialect, make_dialect
from treadle.backends.scripted import ScriptedBackend, ScriptRule


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _StrictScriptRule(ScriptRule):
    # `ScriptRule` itself ignores unknown keys; in a workflow file one is a typo.
    model_config = ConfigDict(extra="forbid")


class ScriptedConfig(_Config):
    backend: Literal["scripted"]
    rules: list[_StrictScriptRule] = Field(default_factory=list)
    latency_s: float = Field(default=0.0, ge=0)


class OpenAICompatConfig(_Config):
    backend: Literal["openai_compat"]
    base_url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    dialect: Literal["vllm", "sglang", "continuum", "llamacpp", "dynamo", "sim", "openai"] = "vllm"
    dialect_options: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    timeout_s: PositiveFloat = 300.0
    connect_timeout_s: PositiveFloat = 5.0
    retries: int = Field(default=2, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)
    metrics_url: str | None = None


class LiteLLMConfig(_Config):
    backend: Literal["litellm"]
    model: str = Field(min_length=1)
    name: str | None = None
    api_key_env: str | None = None
    api_base: str | None = None
    timeout_s: PositiveFloat | None = None
    num_retries: int = Field(default=2, ge=0)
    #: further keyword arguments for every `litellm.acompletion` call
    params: dict[str, Any] = Field(default_factory=dict)


class SimConfig(BaseModel):
    """`sim`'s own options are checked against `SimBackend`'s constructor."""

    model_config = ConfigDict(extra="allow")
    backend: Literal["sim"]


class PoolConfig(BaseModel):
    """`replicas` are model entries themselves; the other options are checked against
    `ReplicaPool`'s constructor."""

    model_config = ConfigDict(extra="allow")
    backend: Literal["pool"]
    replicas: list[dict[str, Any]] = Field(min_length=1)


KINDS: dict[str, type[BaseModel]] = {
    "scripted": ScriptedConfig,
    "openai_compat": OpenAICompatConfig,
    "litellm": LiteLLMConfig,
    "sim": SimConfig,
    "pool": PoolConfig,
}


def create_backend(config: Mapping[str, Any]) -> Backend:
    """The backend a `models:` entry describes. `ValueError` names what is wrong with it."""
    if not isinstance(config, Mapping):
        raise ValueError(f"a model entry must be a mapping, got {type(config).__name__}")
    kind = config.get("backend")
    if kind is None:
        raise ValueError(f"model entry has no 'backend' field; expected one of {', '.join(KINDS)}")
    model = KINDS.get(str(kind))
    if model is None:
        raise ValueError(f"unknown backend {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        parsed = model.model_validate(dict(config))
    except ValidationError as exc:
        raise ValueError(f"invalid {kind!r} model entry: {_describe(exc)}") from None
    return _BUILDERS[str(kind)](parsed)


def _build_scripted(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, ScriptedConfig)
    return ScriptedBackend(list(cfg.rules), latency_s=cfg.latency_s)


def _build_openai_compat(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, OpenAICompatConfig)
    from treadle.backends.openai_compat.backend import OpenAICompatBackend

    if cfg.api_key is not None and cfg.api_key_env is not None:
        raise ValueError(
            "invalid 'openai_compat' model entry: give api_key or api_key_env, not both"
        )
    api_key = cfg.api_key
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ValueError(
                f"invalid 'openai_compat' model entry: api_key_env: "
                f"environment variable {cfg.api_key_env} is not set"
            )
    try:
        dialect = make_dialect(cfg.dialect, **cfg.dialect_options)
    except ValidationError as exc:
        raise ValueError(
            f"invalid 'openai_compat' model entry: dialect_options: {_describe(exc)}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"invalid 'openai_compat' model entry: dialect_options: {exc}") from None
    cls: type[OpenAICompatBackend] = OpenAICompatBackend
    if isinstance(dialect, LlamaCppDialect):
        # slot placement, pins and offload live in the backend: they need the slot table
        from treadle.backends.openai_compat.llamacpp import LlamaCppBackend

        cls = LlamaCppBackend
    return cls(
        cfg.base_url,
        cfg.model,
        dialect=dialect,
        api_key=api_key,
        timeout_s=cfg.timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        headers=cfg.headers,
        name=cfg.name,
        metrics_url=cfg.metrics_url,
    )


def _build_litellm(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, LiteLLMConfig)
    from treadle.backends.litellm import LiteLLMBackend

    params = dict(cfg.params)
    clash = {"model", "messages", "stream"} & set(params)
    if clash:
        raise ValueError(
            f"invalid 'litellm' model entry: params: {', '.join(sorted(clash))} is set by treadle"
        )
    if cfg.api_base is not None:
        params["api_base"] = cfg.api_base
    if cfg.timeout_s is not None:
        params["timeout"] = cfg.timeout_s
    params["num_retries"] = cfg.num_retries
    try:
        return LiteLLMBackend(cfg.model, api_key_env=cfg.api_key_env, name=cfg.name, **params)
    except ImportError as exc:
        raise ValueError(f"backend 'litellm' is not available: {exc}") from None


def _build_sim(cfg: BaseModel) -> Backend:
    sim_backend = _optional("sim", "treadle.backends.sim.backend", "SimBackend")
    options = _extras(cfg)
    # `replica` is a ready SimReplica object: not something a workflow file can hold.
    _check_options("sim", sim_backend, options, skip=("replica",))
    return _construct("sim", sim_backend, options)


def _build_pool(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, PoolConfig)
    replica_pool = _optional("pool", "treadle.backends.dispatch.pool", "ReplicaPool")
    options = _extras(cfg)
    _check_options("pool", replica_pool, options, skip=("replicas", "clock"))
    replicas: list[Backend] = []
    for i, entry in enumerate(cfg.replicas):
        try:
            replicas.append(create_backend(entry))
        except ValueError as exc:
            raise ValueError(f"invalid 'pool' model entry: replicas[{i}]: {exc}") from None
    if "names" not in options:
        names = [getattr(r, "name", None) for r in replicas]
        if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            options["names"] = names
    return _construct("pool", replica_pool, {"replicas": replicas, **options})


_BUILDERS: dict[str, Callable[[BaseModel], Backend]] = {
    "scripted": _build_scripted,
    "openai_compat": _build_openai_compat,
    "litellm": _build_litellm,
    "sim": _build_sim,
    "pool": _build_pool,
}


def _optional(kind: str, module: str, attr: str) -> Callable[..., Backend]:
    """A backend class that lives in a module this build may not have."""
    try:
        found = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ValueError(
            f"backend {kind!r} is not available: cannot import {module} ({exc})"
        ) from None
    except AttributeError:
        raise ValueError(f"backend {kind!r} is not available: {module} has no {attr}") from None
    return found


def _extras(cfg: BaseModel) -> dict[str, Any]:
    return dict(cfg.model_extra or {})


def _check_options(
    kind: str, target: Callable[..., Any], options: Mapping[str, Any], skip: tuple[str, ...]
) -> None:
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if n not in skip
        and n != "self"
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"invalid {kind!r} model entry: unknown field {', '.join(map(repr, unknown))}; "
            f"fields: backend, {', '.join(accepted)}"
        )


def _construct(kind: str, target: Callable[..., Backend], options: dict[str, Any]) -> Backend:
    try:
        return target(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {kind!r} model entry: {exc}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown field")
        else:
            parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)


__all__ = ["KINDS", "create_backend"]
