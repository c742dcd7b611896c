"""`treadle sim`: run simulated GPU serving replicas as OpenAI-compatible HTTP servers.

`treadle.cli.main` mounts `app` under `treadle sim`. The server stack (FastAPI, uvicorn,
prometheus-client) is imported only when a command runs, so `treadle --help` stays quick.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.console import Console

app = typer.Typer(
    help="Simulated GPU serving engines (continuous batching, prefix cache, pins) over HTTP.",
    no_args_is_help=True,
)
console = Console(stderr=True)


@app.callback()
def sim() -> None:
    """Simulated GPU serving engines (keeps `serve` a subcommand however the app is mounted)."""


@app.command()
def serve(
    replicas: Annotated[int, typer.Option("--replicas", "-n", min=1, help="Replicas.")] = 1,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of replica 0; replica i gets PORT+i.")
    ] = 8000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    profile: Annotated[
        str, typer.Option(help="A bundled profile name or a profile .json path.")
    ] = "h100_sxm_llama31_8b",
    policy: Annotated[
        str, typer.Option(help="Engine scheduling: fcfs, priority or program.")
    ] = "fcfs",
    script: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON file of scripted-answer rules (ScriptRule list)."),
    ] = None,
    speed: Annotated[
        float, typer.Option(min=0.001, help="Simulated seconds per wall-clock second.")
    ] = 1.0,
    model: Annotated[
        str | None, typer.Option(help="Served model name (default: sim-<profile model>).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve N simulated replicas on ports PORT..PORT+N-1 (OpenAI chat API + /metrics)."""
    from treadle.backends.sim.engine import SCHEDULING_POLICIES, SchedulingPolicy
    from treadle.backends.sim.profile import Profile
    from treadle.backends.sim.realtime import load_rules
    from treadle.backends.sim.server import build_replicas
    from treadle.backends.sim.server import serve as run_servers

    if policy not in SCHEDULING_POLICIES:
        raise typer.BadParameter(
            f"use one of {', '.join(SCHEDULING_POLICIES)}", param_hint="--policy"
        )
    try:
        prof = Profile.load(profile)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from exc
    try:
        rules = load_rules(script) if script is not None else None
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--script") from exc
    reps = build_replicas(
        replicas,
        profile=prof,
        policy=cast("SchedulingPolicy", policy),  # checked against SCHEDULING_POLICIES above
        rules=rules,
        speed=speed,
        model=model,
    )
    for i, rep in enumerate(reps):
        console.print(
            f"{rep.name}: http://{host}:{port + i}/v1  model={rep.model}  "
            f"profile={prof.name}  policy={policy}  speed={speed}x",
            highlight=False,
        )
    asyncio.run(run_servers(reps, host, port, log_level))
