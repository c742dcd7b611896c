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
  shared:  {backend: gateway, url: "http://gateway:9000/v1"}   # `treadle gateway`
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

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

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
    base_url: str
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

    @field_validator("base_url", "metrics_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {url!r})")
        return url


class GatewayConfig(_Config):
    """`treadle gateway` (`backends/openai_compat/gateway_client.py`)."""

    backend: Literal["gateway"]
    url: str
    model: str = Field(default="default", min_length=1)
    name: str | None = None
    api_key_env: str | None = None
    timeout_s: PositiveFloat = 300.0
    connect_timeout_s: PositiveFloat = 5.0
    #: how long calls are sent again while the gateway is down (a restart)
    outage_s: float = Field(default=30.0, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {url!r})")
        return url


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
    replicas: list[Any] = Field(min_length=1)

    @field_validator("replicas")
    @classmethod
    def _entries(cls, replicas: list[Any]) -> list[Any]:
        for i, entry in enumerate(replicas):
            if not isinstance(entry, Mapping):
                raise ValueError(
                    f"replica {i} is {entry!r}: each replica is a model entry of its own, "
                    "e.g. {backend: openai_compat, base_url: ..., model: ...}"
                )
        return replicas


KINDS: dict[str, type[BaseModel]] = {
    "scripted": ScriptedConfig,
    "openai_compat": OpenAICompatConfig,
    "gateway": GatewayConfig,
    "litellm": LiteLLMConfig,
    "sim": SimConfig,
    "pool": PoolConfig,
}


#: (field, what is wrong) — the field as a dotted path inside the entry ("" for the entry)
EntryProblem = tuple[str, str]


def model_entry_problems(config: Any) -> list[EntryProblem]:
    """Everything wrong with a `models:` entry that can be told without building it: its
    kind, its fields and their values, a dialect's options, the options `sim` and `pool`
    pass to their constructors, and every replica of a pool (`replicas.N.FIELD`). What
    depends on where it runs (an unset `api_key_env`, an optional package) is checked
    when the backend is built."""
    return _checked(config)[1]


def create_backend(config: Mapping[str, Any]) -> Backend:
    """The backend a `models:` entry describes. `ValueError` names what is wrong with it."""
    parsed, problems = _checked(config)
    if parsed is None or problems:
        kind = config.get("backend") if isinstance(config, Mapping) else None
        raise ValueError(describe_entry_problems(kind, problems))
    return _BUILDERS[parsed.backend](parsed)  # type: ignore[attr-defined]


def _checked(config: Any) -> tuple[BaseModel | None, list[EntryProblem]]:
    """The entry parsed (None when it does not parse), and its problems."""
    parsed = _parse(config)
    if isinstance(parsed, list):
        return None, parsed
    return parsed, _CHECKS[parsed.backend](parsed)  # type: ignore[attr-defined]


def describe_entry_problems(kind: Any, problems: list[EntryProblem]) -> str:
    """The problems of one entry as one line."""
    text = "; ".join(f"{field}: {what}" if field else what for field, what in problems)
    return f"invalid {kind!r} model entry: {text}" if kind in KINDS else text


def _parse(config: Any) -> BaseModel | list[EntryProblem]:
    if not isinstance(config, Mapping):
        return [("", f"a model entry must be a mapping, got {type(config).__name__}")]
    kind = config.get("backend")
    if kind is None:
        return [("", f"model entry has no 'backend' field; expected one of {', '.join(KINDS)}")]
    model = KINDS.get(str(kind))
    if model is None:
        return [("backend", f"unknown backend {kind!r}; expected one of {', '.join(KINDS)}")]
    try:
        return model.model_validate(dict(config))
    except ValidationError as exc:
        return _problems(exc)


def _check_scripted(cfg: BaseModel) -> list[EntryProblem]:
    return []


def _check_openai_compat(cfg: BaseModel) -> list[EntryProblem]:
    assert isinstance(cfg, OpenAICompatConfig)
    problems: list[EntryProblem] = []
    if cfg.api_key is not None and cfg.api_key_env is not None:
        problems.append(("api_key_env", "give api_key or api_key_env, not both"))
    try:
        make_dialect(cfg.dialect, **cfg.dialect_options)
    except ValidationError as exc:
        problems += [(f"dialect_options.{f}".rstrip("."), w) for f, w in _problems(exc)]
    except ValueError as exc:
        problems.append(("dialect_options", str(exc)))
    return problems


def _check_litellm(cfg: BaseModel) -> list[EntryProblem]:
    assert isinstance(cfg, LiteLLMConfig)
    clash = {"model", "messages", "stream"} & set(cfg.params)
    if clash:
        return [("params", f"{', '.join(sorted(clash))} is set by treadle")]
    return []


def _check_sim(cfg: BaseModel) -> list[EntryProblem]:
    try:
        sim_backend = _optional("sim", "treadle.backends.sim.backend", "SimBackend")
    except ValueError as exc:
        return [("backend", str(exc))]
    # `replica` is a ready SimReplica object: not something a workflow file can hold.
    return _unknown_options(sim_backend, _extras(cfg), skip=("replica",))


def _check_pool(cfg: BaseModel) -> list[EntryProblem]:
    assert isinstance(cfg, PoolConfig)
    try:
        replica_pool = _optional("pool", "treadle.backends.dispatch.pool", "ReplicaPool")
    except ValueError as exc:
        return [("backend", str(exc))]
    problems = _unknown_options(replica_pool, _extras(cfg), skip=("replicas", "clock"))
    for i, entry in enumerate(cfg.replicas):
        for field, what in model_entry_problems(entry):
            problems.append((f"replicas.{i}.{field}".rstrip("."), what))
    return problems


_CHECKS: dict[str, Callable[[BaseModel], list[EntryProblem]]] = {
    "scripted": _check_scripted,
    "openai_compat": _check_openai_compat,
    "gateway": lambda cfg: [],
    "litellm": _check_litellm,
    "sim": _check_sim,
    "pool": _check_pool,
}


def _build_scripted(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, ScriptedConfig)
    return ScriptedBackend(list(cfg.rules), latency_s=cfg.latency_s)


def _build_openai_compat(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, OpenAICompatConfig)
    from treadle.backends.openai_compat.backend import OpenAICompatBackend

    api_key = cfg.api_key
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ValueError(
                f"invalid 'openai_compat' model entry: api_key_env: "
                f"environment variable {cfg.api_key_env} is not set"
            )
    dialect = make_dialect(cfg.dialect, **cfg.dialect_options)  # checked before building
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


def _build_gateway(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, GatewayConfig)
    from treadle.backends.openai_compat.gateway_client import GatewayBackend

    api_key = None
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ValueError(
                f"invalid 'gateway' model entry: api_key_env: "
                f"environment variable {cfg.api_key_env} is not set"
            )
    return GatewayBackend(
        cfg.url,
        cfg.model,
        outage_s=cfg.outage_s,
        api_key=api_key,
        timeout_s=cfg.timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        headers=cfg.headers,
        name=cfg.name,
    )


def _build_litellm(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, LiteLLMConfig)
    from treadle.backends.litellm import LiteLLMBackend

    params = dict(cfg.params)
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
    return _construct("sim", sim_backend, _extras(cfg))


def _build_pool(cfg: BaseModel) -> Backend:
    assert isinstance(cfg, PoolConfig)
    replica_pool = _optional("pool", "treadle.backends.dispatch.pool", "ReplicaPool")
    options = _extras(cfg)
    replicas: list[Backend] = []
    for i, entry in enumerate(cfg.replicas):
        try:
            replicas.append(create_backend(entry))
        except ValueError as exc:
            raise ValueError(f"invalid 'pool' model entry: replicas.{i}: {exc}") from None
    if "names" not in options:
        names = [getattr(r, "name", None) for r in replicas]
        if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            options["names"] = names
    return _construct("pool", replica_pool, {"replicas": replicas, **options})


_BUILDERS: dict[str, Callable[[BaseModel], Backend]] = {
    "scripted": _build_scripted,
    "openai_compat": _build_openai_compat,
    "gateway": _build_gateway,
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


def _unknown_options(
    target: Callable[..., Any], options: Mapping[str, Any], skip: tuple[str, ...]
) -> list[EntryProblem]:
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [
        n
        for n, p in params.items()
        if n not in skip
        and n != "self"
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    fields = f"fields: backend, {', '.join(accepted)}"
    return [(name, f"unknown field; {fields}") for name in sorted(set(options) - set(accepted))]


def _construct(kind: str, target: Callable[..., Backend], options: dict[str, Any]) -> Backend:
    try:
        return target(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {kind!r} model entry: {exc}") from None


def _problems(exc: ValidationError) -> list[EntryProblem]:
    out: list[EntryProblem] = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            out.append((loc, "unknown field"))
        elif error["type"] == "value_error":  # our validators' messages, without the prefix
            out.append((loc, str(error["ctx"]["error"])))
        else:
            out.append((loc, error["msg"]))
    return out


__all__ = ["KINDS", "create_backend", "model_entry_problems"]
