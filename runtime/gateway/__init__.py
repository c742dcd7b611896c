"""`treadle gateway`: one scheduler for every worker, as an OpenAI-compatible HTTP server.

The gateway holds the workflow-atomic scheduler (`treadle.runtime.sched`) and prefix-aware
dispatch (`treadle.backends.dispatch.routing`) in front of replicas of any dialect, so the
calls of all workers (and of any OpenAI client) are ordered by one view: tenant fair
shares, least attained service per program, program affinity. Modules:

- `config`: what it serves (models, replicas, tenants), from flags or a file;
- `upstream`: replicas of one model, routing and failover, the shared HTTP client;
- `scheduling`: programs and calls of the scheduler, per served model;
- `state`: tenant accounting and the program table in Redis (a restart resumes shares);
- `tracing`: the gateway's span between the caller's trace and the engine's;
- `context`: `Gateway`, what the request path serves with;
- `chat`: the hot path, `POST /v1/chat/completions`, a plain ASGI handler;
- `app`: the rest of the HTTP API (models, health, metrics, program end);
- `metrics`: Prometheus counters and gauges;
- `serve`: uvicorn with the fastest loop available.

(Not to be confused with `treadle.runtime.core.gateway`, the in-process path of a run's
LLM calls.)
"""
