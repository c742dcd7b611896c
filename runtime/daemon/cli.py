"""The daemon's commands: `serve`, `worker`, `submit`, `status`, `logs` and `tenants`.

`register(app)` adds them to the `treadle` CLI. Run as a module (`python -m
treadle.runtime.daemon.cli worker ...`) the same commands work without the rest of the CLI, which
is how tests and the service benchmark start worker and server processes.

Server-side commands take the Redis URL (`--redis`, or `TREADLE_REDIS_URL`); client
commands take the daemon's URL and an API key (`--url`/`--key`, or `TREADLE_URL` and
`TREADLE_API_KEY`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_URL = "http://127.0.0.1:8080"

RedisOpt = Annotated[str, typer.Option("--redis", envvar="TREADLE_REDIS_URL", help="Redis URL.")]
PrefixOpt = Annotated[str, typer.Option(help="First part of every Redis key.")]
UrlOpt = Annotated[str, typer.Option("--url", envvar="TREADLE_URL", help="The daemon's URL.")]
KeyOpt = Annotated[
    str,
    typer.Option("--key", envvar="TREADLE_API_KEY", help="An API key.", show_default=False),
]
LeaseOpt = Annotated[
    int, typer.Option(help="Run lease time (ms): a dead worker's runs move after about this.")
]
ConcurrencyOpt = Annotated[int, typer.Option(help="Runs one worker loop executes at once.")]
MaxRunsOpt = Annotated[
    int | None,
    typer.Option(
        help="Runs this process executes at once, over all its worker loops "
        "(default: loops × --concurrency).",
        show_default=False,
    ),
]
ModelsOpt = Annotated[
    Path | None,
    typer.Option(help="YAML/JSON file: model alias -> backend config, offered to every workflow."),
]
LogOpt = Annotated[str, typer.Option(help="Log level (debug, info, warning, error).")]
RetainOpt = Annotated[
    float,
    typer.Option(
        help="Days a finished run (record, outputs, events) is kept before Redis expires it; "
        "0 keeps runs forever."
    ),
]
AllowImportsOpt = Annotated[
    str,
    typer.Option(
        help="Comma list of module prefixes workflows may import (pkg.mod:attr) from; "
        "built-in tools are always allowed. Workers check it again before running a run."
    ),
]
TokensOpt = Annotated[
    bool,
    typer.Option(
        help="Stream LLM answers as llm_tokens events to event streams (costs CPU per call)."
    ),
]
NiceOpt = Annotated[
    int,
    typer.Option(
        min=0,
        max=19,
        help="Niceness of worker processes: on a machine shared with the API, its answers "
        "come first.",
    ),
]
FilesRootOpt = Annotated[
    Path | None,
    typer.Option(
        help="Directory whose <tenant> subdirectories the read_file tool may read, each "
        "tenant its own; without it read_file reads nothing.",
        show_default=False,
    ),
]
AllowBackendsOpt = Annotated[
    str, typer.Option(help="Comma list of backends workflows may declare in models:.")
]


#: a problem that says where it is (`FILE:LINE:COL: ...`, `FILE:LINE: ...`)
_LOCATED = re.compile(r"\S+:\d+:(?:\d+:)? ")


def problem_text(line: str) -> Text:
    """One problem as the CLIs print it: a located one (`FILE:LINE:COL: message`, what
    editors and CI annotators read) as it is, any other after `error: `; never Rich
    markup (`nodes[a]`, `pip install 'treadle[otel]'` keep their brackets). Print it with
    `soft_wrap=True`: one problem stays one line at any terminal width, and in a pipe."""
    if _LOCATED.match(line):
        return Text(line)
    return Text.assemble(("error: ", "red"), line)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(problem_text(message), soft_wrap=True)
    return typer.Exit(code)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def load_data_file(path: Path, option: str) -> Any:
    """The data of a JSON or YAML file named by a command-line option (ruamel.yaml, the
    workflow loader's parser; YAML 1.2). A file that does not parse exits with `OPTION
    FILE:LINE:COL: WHAT` on one line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    from treadle.graphs.files.document import yaml_syntax_error

    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return YAML(typ="safe", pure=True).load(text)
    except OSError as exc:
        raise _fail(f"{option} {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise _fail(f"{path}:{exc.lineno}:{exc.colno}: {option}: {exc.msg}") from None
    except MarkedYAMLError as exc:
        line, col, what = yaml_syntax_error(exc)
        raise _fail(f"{path}:{line}:{col}: {option}: {what}") from None
    except YAMLError as exc:
        raise _fail(f"{option} {path}: {' '.join(str(exc).split())}") from None


def _models(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    data = load_data_file(path, "--models")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise _fail(f"--models {path}: expected a mapping of alias -> backend config")
    return {str(k): v for k, v in data.items()}


def _retain_s(days: float) -> float:
    if not days >= 0:  # (also refuses NaN)
        raise _fail(f"--retain-days {days}: must be >= 0 (0 keeps finished runs forever)")
    return days * 24 * 3600


def _files_root(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_dir():
        raise _fail(f"--files-root {path}: not a directory")
    return str(path.resolve())


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _config(**kwargs: Any) -> Any:
    from treadle.runtime.daemon.config import DaemonConfig

    try:
        return DaemonConfig(**kwargs)
    except ValueError as exc:
        raise _fail(str(exc)) from None


# -- server side -----------------------------------------------------------------------


def serve(
    redis: RedisOpt = DEFAULT_REDIS,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="API only; runs execute in `treadle worker`s.")
    ] = False,
    worker_processes: Annotated[
        int,
        typer.Option(help="Worker processes this server starts and restarts if they die."),
    ] = 1,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Run the worker loops inside the API's process (development: a heavy run "
            "then slows every tenant's API calls).",
        ),
    ] = False,
    workers_per_process: Annotated[
        int, typer.Option(help="Worker loops in each worker process (or in-process).")
    ] = 1,
    worker_nice: NiceOpt = 0,
    concurrency: ConcurrencyOpt = 64,
    allow_imports: AllowImportsOpt = "",
    allow_backends: AllowBackendsOpt = "scripted,sim",
    models: ModelsOpt = None,
    lease_ms: LeaseOpt = 10_000,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).")] = 1
    << 20,
    max_concurrent_runs: MaxRunsOpt = None,
    prefix: PrefixOpt = "treadle",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    retain_days: RetainOpt = 7.0,
    metrics_token: Annotated[
        str | None,
        typer.Option(
            envvar="TREADLE_METRICS_TOKEN",
            help="Bearer token /metrics requires (Authorization: Bearer <token>).",
            show_default=False,
        ),
    ] = None,
    metrics_public: Annotated[
        bool,
        typer.Option(
            "--metrics-public", help="Serve /metrics without a token (private networks only)."
        ),
    ] = False,
    stream_tokens: TokensOpt = True,
    files_root: FilesRootOpt = None,
    tenant_rate: Annotated[
        float, typer.Option(help="Requests per second one tenant may make (0: no limit).")
    ] = 50.0,
    tenant_burst: Annotated[int, typer.Option(help="Requests above that rate at once.")] = 100,
    tenant_in_flight: Annotated[
        int, typer.Option(help="Requests of one tenant in progress at once.")
    ] = 32,
    tenant_event_streams: Annotated[
        int, typer.Option(help="Event streams one tenant may hold open at once.")
    ] = 16,
    header_timeout_s: Annotated[
        float, typer.Option(help="Seconds a request's headers may take to arrive.")
    ] = 10.0,
    body_timeout_s: Annotated[
        float, typer.Option(help="Seconds a request's body may take to arrive (408).")
    ] = 30.0,
    log_level: LogOpt = "info",
) -> None:
    """Serve the HTTP API, with --worker-processes worker processes it supervises (none
    with --no-worker; loops in its own process with --in-process).

    /metrics needs --metrics-token (or TREADLE_METRICS_TOKEN) or --metrics-public; without
    either it answers 401. Finished runs expire after --retain-days."""
    from treadle.runtime.daemon.api.app import create_app
    from treadle.runtime.daemon.api.server import serve as serve_api

    _logging(log_level)
    config = _config(
        redis_url=redis,
        prefix=prefix,
        allow_imports=_csv(allow_imports),
        allow_backends=_csv(allow_backends),
        models=_models(models),
        max_body_bytes=max_body_bytes,
        lease_ms=lease_ms,
        worker_concurrency=concurrency,
        max_concurrent_runs=max_concurrent_runs,
        retain_s=_retain_s(retain_days),
        worker_nice=worker_nice,
        metrics_token=metrics_token,
        metrics_public=metrics_public,
        stream_tokens=stream_tokens,
        files_root=_files_root(files_root),
        tenant_rate_per_s=tenant_rate,
        tenant_rate_burst=tenant_burst,
        tenant_max_in_flight=tenant_in_flight,
        max_event_streams_per_tenant=tenant_event_streams,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
    )
    loops = max(1, workers_per_process)
    if no_worker or (worker_processes < 1 and not in_process):
        app = create_app(config)
    elif in_process:
        app = create_app(config, workers=loops)
    else:
        app = create_app(
            config, workers=loops, worker_processes=worker_processes, log_level=log_level
        )
    serve_api(app, config, host=host, port=port, log_level=log_level, access_log=access_log)


def worker(
    redis: RedisOpt = DEFAULT_REDIS,
    count: Annotated[int, typer.Option(help="Worker loops in this process.")] = 1,
    concurrency: ConcurrencyOpt = 64,
    max_concurrent_runs: MaxRunsOpt = None,
    models: ModelsOpt = None,
    lease_ms: LeaseOpt = 10_000,
    drain_s: Annotated[
        float, typer.Option(help="On SIGTERM, time runs get to finish before handing over.")
    ] = 10.0,
    nice: NiceOpt = 0,
    prefix: PrefixOpt = "treadle",
    allow_imports: AllowImportsOpt = "",
    allow_backends: AllowBackendsOpt = "scripted,sim",
    retain_days: RetainOpt = 7.0,
    stream_tokens: TokensOpt = True,
    files_root: FilesRootOpt = None,
    log_level: LogOpt = "info",
    config_from_env: Annotated[
        bool,
        typer.Option(
            "--config-from-env",
            hidden=True,
            help="Take the whole configuration from TREADLE_DAEMON_CONFIG (treadle serve's "
            "worker processes).",
        ),
    ] = False,
) -> None:
    """Execute runs from the daemon's work queue (start as many as you like, anywhere).

    Give it the same --allow-imports/--allow-backends as `treadle serve`: the worker checks
    every definition against them again before importing anything, and fails runs whose
    definition they refuse."""
    from treadle.runtime.daemon.worker_process import run_worker_process

    _logging(log_level)
    parent: int | None = None
    if config_from_env:
        import os

        from treadle.runtime.daemon import supervisor

        config = supervisor.config_from_env(os.environ[supervisor.CONFIG_ENV])
        parent = int(os.environ.get(supervisor.PARENT_ENV) or os.getppid())
    else:
        config = _config(
            redis_url=redis,
            prefix=prefix,
            models=_models(models),
            lease_ms=lease_ms,
            worker_concurrency=concurrency,
            max_concurrent_runs=max_concurrent_runs,
            drain_s=drain_s,
            worker_nice=nice,
            allow_imports=_csv(allow_imports),
            allow_backends=_csv(allow_backends),
            retain_s=_retain_s(retain_days),
            files_root=_files_root(files_root),
            stream_tokens=stream_tokens,
        )
    anyio.run(
        functools.partial(run_worker_process, parent=parent),
        config,
        max(1, count),
        backend_options=_loop_options(),
    )


def _loop_options() -> dict[str, Any]:
    """uvloop when it is installed (a faster event loop; uvicorn picks it up by itself too),
    else asyncio's own. treadle does not depend on it."""
    import importlib.util

    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}


# -- tenants ---------------------------------------------------------------------------

tenants_app = typer.Typer(help="Tenants and their API keys (run against the daemon's Redis).")


async def _with_tenants(redis: str, prefix: str, fn: Any) -> Any:
    from treadle.runtime.daemon.keys import DaemonKeys
    from treadle.runtime.daemon.tenants import TenantStore
    from treadle.runtime.stores.redis import connect

    client = connect(redis)
    try:
        return await fn(TenantStore(client, DaemonKeys(prefix)))
    finally:
        await client.aclose()


def _run_tenants(redis: str, prefix: str, fn: Any) -> Any:
    from redis.exceptions import RedisError

    from treadle.runtime.daemon.tenants import TenantError

    try:
        return anyio.run(_with_tenants, redis, prefix, fn)
    except TenantError as exc:
        raise _fail(str(exc)) from None
    except (RedisError, OSError) as exc:
        raise _fail(f"Redis at {redis}: {exc}") from None


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant id: lowercase letters, digits, _ and -.")],
    max_concurrent_runs: Annotated[int, typer.Option(help="Runs in progress at once.")] = 100,
    tokens_per_minute: Annotated[
        int | None, typer.Option(help="LLM tokens per minute (default: unlimited).")
    ] = None,
    add_key: Annotated[
        bool, typer.Option("--add-key", help="The tenant exists: issue another key.")
    ] = False,
    redis: RedisOpt = DEFAULT_REDIS,
    prefix: PrefixOpt = "treadle",
) -> None:
    """Create a tenant and print its API key (shown once: store it now)."""

    async def go(store: Any) -> Any:
        if not add_key:
            await store.create(
                name, max_concurrent_runs=max_concurrent_runs, tokens_per_minute=tokens_per_minute
            )
        return await store.issue_key(name)

    issued = _run_tenants(redis, prefix, go)
    err_console.print(f"tenant [bold]{name}[/], key id {issued.key.key_id}; the key:")
    print(issued.token)


@tenants_app.command("list")
def tenants_list(redis: RedisOpt = DEFAULT_REDIS, prefix: PrefixOpt = "treadle") -> None:
    """List tenants, their quotas and key ids."""
    from rich.table import Table

    rows = _run_tenants(redis, prefix, lambda store: store.list_tenants())
    table = Table("tenant", "status", "max runs", "tokens/min", "keys (id: status)")
    for tenant, keys in rows:
        key_text = ", ".join(f"{k.key_id}: {'revoked' if k.revoked else 'active'}" for k in keys)
        table.add_row(
            tenant.id,
            "revoked" if tenant.revoked else "active",
            str(tenant.max_concurrent_runs),
            str(tenant.tokens_per_minute or "unlimited"),
            key_text or "-",
        )
    console.print(table)


@tenants_app.command("revoke")
def tenants_revoke(
    name: Annotated[str, typer.Argument(help="The tenant (with --key: the key's tenant).")],
    key: Annotated[
        str | None, typer.Option("--key", help="Revoke only this key id, not the tenant.")
    ] = None,
    redis: RedisOpt = DEFAULT_REDIS,
    prefix: PrefixOpt = "treadle",
) -> None:
    """Revoke a tenant (all its keys stop working at once) or one of its keys."""
    from treadle.runtime.daemon.tenants import TenantError

    async def go(store: Any) -> str:
        if key is None:
            count = await store.revoke_tenant(name)
            return f"tenant {name} revoked ({count} keys)"
        found = await store.revoke_key(key)
        if found.tenant != name:
            raise TenantError(f"key {key} does not belong to tenant {name!r}")
        return f"key {key} of tenant {name} revoked"

    console.print(_run_tenants(redis, prefix, go))


# -- values given on the command line ----------------------------------------------


def input_value(raw: str, option: str = "--input") -> Any:
    """A value given on the command line: JSON, or @FILE (a JSON or YAML file)."""
    if raw.startswith("@"):
        path = Path(raw[1:])
        if not path.exists():
            raise _fail(f"{option} {raw}: no such file")
        return load_data_file(path, option)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(f"{option} is not valid JSON: {exc}") from None


def register(app: typer.Typer) -> None:
    """Add the daemon's commands to `app` (the `treadle` CLI)."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(tenants_app, name="tenants")


def main() -> None:
    standalone = typer.Typer(
        name="treadle-daemon", no_args_is_help=True, add_completion=False,
        pretty_exceptions_enable=False,
    )  # fmt: skip
    register(standalone)
    standalone()


if __name__ == "__main__":
    main()
