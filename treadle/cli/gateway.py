"""`treadle gateway`: the agent-aware OpenAI-compatible gateway in front of replicas
(`treadle.runtime.gateway`). The server stack is imported only when the command runs."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def gateway(
    config: Annotated[
        Path | None, typer.Option(help="A gateway config file (YAML/JSON): models, tenants, redis.")
    ] = None,
    replica: Annotated[
        list[str] | None,
        typer.Option("--replica", "-r", help="An engine's URL (repeat for each replica)."),
    ] = None,
    model: Annotated[str, typer.Option(help="The model name clients ask for.")] = "default",
    upstream_model: Annotated[
        str | None, typer.Option(help="The model name the replicas know (default: --model).")
    ] = None,
    dialect: Annotated[
        str,
        typer.Option(
            help="The replicas' dialect: vllm, sglang, continuum, llamacpp, dynamo, sim, openai."
        ),
    ] = "vllm",
    routing: Annotated[
        str, typer.Option(help="treadle, cache_aware, least_load or round_robin.")
    ] = "treadle",
    max_in_flight: Annotated[
        int | None,
        typer.Option(min=1, help="Calls in flight to the replicas at once (default: learned)."),
    ] = None,
    tenant: Annotated[
        list[str] | None, typer.Option("--tenant", help="A tenant's weight, NAME=WEIGHT (repeat).")
    ] = None,
    redis: Annotated[
        str | None, typer.Option(help="Redis URL: tenant accounting and programs survive restarts.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 9000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible API that schedules every client's calls together
    (workflow-atomic scheduling, tenant fair shares, prefix-aware dispatch)."""
    from treadle.runtime.gateway.config import (
        GatewayConfigError,
        config_from_flags,
        load_config,
    )
    from treadle.runtime.gateway.serve import serve
    from treadle.runtime.observe.tracing_setup import configure_tracing

    try:
        if config is not None:
            if replica:
                raise GatewayConfigError("give replicas in --config or with --replica, not both")
            cfg = load_config(config)
            if redis is not None:
                cfg = cfg.model_copy(update={"redis_url": redis})
        elif replica:
            cfg = config_from_flags(
                replica,
                model=model,
                upstream_model=upstream_model,
                dialect=dialect,
                routing=routing,
                max_in_flight=max_in_flight,
                tenants=tenant or [],
                redis_url=redis,
            )
        else:
            raise GatewayConfigError(
                "no replicas: give --replica URL (repeatable) or --config FILE"
            )
    except (GatewayConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    configure_tracing(set_global=True)
    for name, mc in cfg.models.items():
        for r in mc.replicas:
            console.print(f"{name} -> {r.url} ({r.dialect})", highlight=False)
    console.print(f"treadle gateway: http://{host}:{port}/v1", highlight=False)
    loop_factory = None
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(cfg, host, port, log_level))
