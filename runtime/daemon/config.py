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
    #: how long loading and checking one definition may take (422 above)
    check_timeout_s: float = 10.0
    #: event streams (SSE) served at once by one API process (503 above)
    max_event_streams: int = 256
    #: event streams one tenant may hold open at once on one API process (429 above)
    max_event_streams_per_tenant: int = 16
    #: requests per second one tenant may make to one API process, on average (429 above;
    #: 0: no limit)
    tenant_rate_per_s: float = 50.0
    #: requests one tenant may make at once above that rate (the token bucket's size)
    tenant_rate_burst: int = 100
    #: requests of one tenant in progress at once on one API process (429 above)
    tenant_max_in_flight: int = 32
    #: a request's line and headers must arrive within this, else the connection is closed
    header_timeout_s: float = 10.0
    #: a request's body must arrive within this once its headers have (408 above)
    body_timeout_s: float = 30.0
    #: the directory under which each tenant's `read_file` reads (`<files_root>/<tenant>`);
    #: None: `read_file` reads nothing at all in the daemon
    files_root: str | None = None
    #: the run lease's time to live; a dead worker's runs are taken over after about this
    lease_ms: int = 10_000
    #: runs executed at once by one worker (one claim loop)
    worker_concurrency: int = 64
    #: runs executed at once by one process, over all its workers; None: workers ×
    #: `worker_concurrency`
    max_concurrent_runs: int | None = None
    #: on shutdown, how long a worker lets its runs finish before handing them over
    drain_s: float = 10.0
    #: niceness a worker process adds to itself (0-19): on a machine it shares with an API
    #: process, the API's answers then come first and the runs absorb the wait
    worker_nice: int = 0
    #: a finished run's keys expire this long after it settles (s); 0 keeps them forever
    retain_s: float = DEFAULT_RETAIN_S
    #: bearer token `/metrics` requires (compared in constant time); None: see metrics_public
    metrics_token: str | None = field(default=None, repr=False)
    #: serve `/metrics` without a token (a private network); with neither, `/metrics` is 401
    metrics_public: bool = False
    #: workers stream LLM answers (backends that can) as `LLMTokens` events, batched
    stream_tokens: bool = True

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
        if not 0 <= self.worker_nice <= 19:
            raise ValueError("worker_nice must be between 0 and 19")
        if self.lease_ms < 100:
            raise ValueError("lease_ms must be >= 100")
        if self.max_event_streams < 1 or self.max_event_streams_per_tenant < 1:
            raise ValueError("max_event_streams and max_event_streams_per_tenant must be >= 1")
        if not self.tenant_rate_per_s >= 0 or self.tenant_rate_burst < 1:
            raise ValueError("tenant_rate_per_s must be >= 0 (0: no limit), tenant_rate_burst >= 1")
        if self.tenant_max_in_flight < 1:
            raise ValueError("tenant_max_in_flight must be >= 1")
        if not (self.header_timeout_s > 0 and self.body_timeout_s > 0):
            raise ValueError("header_timeout_s and body_timeout_s must be > 0")
