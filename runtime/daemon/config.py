"""The daemon's configuration: one frozen object built by `treadle serve` / `treadle worker`
(or by tests and the service benchmark) and handed to everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: backends a tenant's workflow may declare in `models:` unless the operator says otherwise:
#: neither can reach the network or read the server's environment (api_key_env)
DEFAULT_ALLOWED_BACKENDS: tuple[str, ...] = ("scripted", "sim")
#: how long a finished run's record, outputs and journal are kept (7 days)
DEFAULT_RETAIN_S: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class DaemonConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: first part of every Redis key (several deployments can share one Redis)
    prefix: str = "treadle"
    #: module prefixes a workflow may import from (`pkg.mod:attr`); built-in tools always
    allow_imports: tuple[str, ...] = ()
    #: backend kinds a workflow may declare in its `models:`
    allow_backends: tuple[str, ...] = DEFAULT_ALLOWED_BACKENDS
    #: model aliases the operator provides to every workflow (alias -> backend config)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: largest request body accepted (413 above)
    max_body_bytes: int = 1 << 20
    #: largest workflow definition accepted (422 above)
    max_definition_bytes: int = 256 * 1024
    #: event streams (SSE) served at once by one API process (503 above)
    max_event_streams: int = 256
    #: the run lease's time to live; a dead worker's runs are taken over after about this
    lease_ms: int = 10_000
    #: runs executed at once by one worker (one claim loop)
    worker_concurrency: int = 64
    #: runs executed at once by one process, over all its workers; None: workers ×
    #: `worker_concurrency`
    max_concurrent_runs: int | None = None
    #: on shutdown, how long a worker lets its runs finish before handing them over
    drain_s: float = 10.0
    #: a finished run's keys expire this long after it settles (s); 0 keeps them forever
    retain_s: float = DEFAULT_RETAIN_S
    #: bearer token `/metrics` requires (compared in constant time); None: see metrics_public
    metrics_token: str | None = field(default=None, repr=False)
    #: serve `/metrics` without a token (a private network); with neither, `/metrics` is 401
    metrics_public: bool = False

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{} "):
            raise ValueError(f"prefix {self.prefix!r}: must be non-empty, without braces/spaces")
        for module in self.allow_imports:
            parts = module.split(".")
            if not module or not all(p.isidentifier() for p in parts):
                raise ValueError(f"allow_imports: {module!r} is not a module name like pkg.mod")
        if self.max_body_bytes < 1024 or self.max_definition_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1024 and max_definition_bytes >= 1")
        if self.retain_s < 0:
            raise ValueError("retain_s must be >= 0 (0 keeps finished runs forever)")
        if self.metrics_token is not None and not self.metrics_token.strip():
            raise ValueError("metrics_token must not be empty")
        if self.worker_concurrency < 1:
            raise ValueError("worker_concurrency must be >= 1")
        if self.max_concurrent_runs is not None and self.max_concurrent_runs < 1:
            raise ValueError("max_concurrent_runs must be >= 1 (or None: no cap per process)")
        if self.lease_ms < 100:
            raise ValueError("lease_ms must be >= 100")
