"""What a gateway serves: models, each a pool of replicas of one dialect or several, and
the tenants' weights; from command-line flags or a YAML/JSON file.

```yaml
models:
  default:
    routing: treadle              # treadle | cache_aware | least_load | round_robin
    max_in_flight: 256            # calls in flight to this model's replicas (None: adaptive)
    replicas:
      - {url: "http://gpu1:8000/v1", model: meta-llama/Llama-3.1-8B-Instruct, dialect: vllm}
      - {url: "http://gpu2:30000/v1", model: meta-llama/Llama-3.1-8B-Instruct, dialect: sglang}
tenants: {acme: 2, globex: 1}
redis_url: redis://localhost:6379/0     # tenant accounting and programs survive a restart
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from treadle.backends.dispatch.routing import ROUTING_POLICIES
from treadle.backends.openai_compat.dialects import DIALECTS, Dialect, make_dialect
from treadle.errors import GatewayError


class GatewayConfigError(GatewayError, ValueError):
    """The gateway's configuration is wrong; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaConfig(_Strict):
    """One engine server."""

    url: str
    #: the model name the server knows (default: the name the gateway serves it under)
    model: str | None = None
    dialect: str = "vllm"
    dialect_options: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    api_key_env: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {url!r})")
        return url.rstrip("/")

    @field_validator("dialect")
    @classmethod
    def _dialect(cls, name: str) -> str:
        if name not in DIALECTS or name == "gateway":
            known = ", ".join(d for d in DIALECTS if d != "gateway")
            raise ValueError(f"unknown dialect {name!r}; expected one of {known}")
        return name

    def make_dialect(self) -> Dialect:
        return make_dialect(self.dialect, **self.dialect_options)

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise GatewayConfigError(
                f"api_key_env: environment variable {self.api_key_env} is not set"
            )
        return key


class ModelConfig(_Strict):
    """A served model: a pool of replicas."""

    replicas: list[ReplicaConfig] = Field(min_length=1)
    routing: str = "treadle"
    #: calls in flight to this model's replicas at once; None: learned (AIMD from TTFT)
    max_in_flight: int | None = Field(default=None, ge=1)

    @field_validator("routing")
    @classmethod
    def _routing(cls, name: str) -> str:
        if name not in ROUTING_POLICIES:
            raise ValueError(
                f"unknown routing {name!r}; expected one of {', '.join(ROUTING_POLICIES)}"
            )
        return name


class GatewayConfig(_Strict):
    models: dict[str, ModelConfig] = Field(min_length=1)
    #: tenant -> weight (others weigh 1)
    tenants: dict[str, PositiveFloat] = Field(default_factory=dict)
    redis_url: str | None = None
    #: Redis key prefix (gateways that share a Redis but not their tenants use different ones)
    redis_prefix: str = "treadle:gateway"
    #: a program with no call for this long is closed (its run ended without saying so)
    program_idle_s: PositiveFloat = 600.0
    #: upstream: seconds to connect, and to wait for bytes
    connect_timeout_s: PositiveFloat = 5.0
    timeout_s: PositiveFloat = 600.0


def load_config(path: Path) -> GatewayConfig:
    """A gateway config file (YAML or JSON)."""
    from ruamel.yaml import YAML, YAMLError

    try:
        data = YAML(typ="safe").load(path.read_text())
    except (OSError, YAMLError) as exc:
        raise GatewayConfigError(f"{path}: {exc}") from None
    return parse_config(data, str(path))


def parse_config(data: Any, where: str = "config") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        ]
        raise GatewayConfigError(f"{where}: " + "; ".join(lines)) from None


def config_from_flags(
    replicas: list[str],
    *,
    model: str = "default",
    upstream_model: str | None = None,
    dialect: str = "vllm",
    routing: str = "treadle",
    max_in_flight: int | None = None,
    tenants: Sequence[str] = (),
    redis_url: str | None = None,
) -> GatewayConfig:
    """The config of `treadle gateway --replica URL ... [--tenant NAME=WEIGHT ...]`: one
    model served from every replica."""
    weights: dict[str, float] = {}
    for item in tenants:
        name, sep, weight = item.partition("=")
        try:
            weights[name] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise GatewayConfigError(f"--tenant {item!r}: expected NAME=WEIGHT, e.g. acme=2")
    data = {
        "models": {
            model: {
                "replicas": [
                    {"url": url, "model": upstream_model, "dialect": dialect} for url in replicas
                ],
                "routing": routing,
                "max_in_flight": max_in_flight,
            }
        },
        "tenants": weights,
        "redis_url": redis_url,
    }
    return parse_config(data, "flags")
