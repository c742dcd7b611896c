"""`treadle sim`: run simulated GPU serving replicas as OpenAI-compatible HTTP servers.

`treadle.cli.main` mounts `app` under `treadle sim`. The server stack (FastAPI, uvicorn,
prometheus-client) is imported only when a command runs, so `treadle --help` stays quick.
"""

from __future__ import annotations

import asyncio
import math
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


@app.command()
def calibrate(
    server: Annotated[
        str | None,
        typer.Option(help="The server to measure (its root or /v1 URL), e.g. a vLLM replica."),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="Start a server of this engine instead (llamacpp: a local build)."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(help="Base profile (hardware and model) whose efficiencies are fitted."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="The served model name.")] = None,
    dialect: Annotated[
        str, typer.Option(help="The server's dialect (vllm, sglang, ...).")
    ] = "vllm",
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the calibrated profile here.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the whole report (probes, fit) here.")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Fewer probes and a shorter mix.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and the mix.")] = 0,
    nice: Annotated[
        int,
        typer.Option(
            help="With --engine: the niceness the server and the client run at (0: as "
            "started), so other work on a shared machine barely slows what is measured."
        ),
    ] = -10,
) -> None:
    """Fit a simulator profile to a real server, then report its error on a held-back mix.

    Against a running server: `--server URL --profile BASE --model NAME [--dialect vllm]`.
    `--engine llamacpp` starts a local llama-server with treadle's small test model instead.
    """
    from treadle.cli.calibrate import run_calibration

    if (server is None) == (engine is None):
        raise typer.BadParameter("give --server URL or --engine llamacpp", param_hint="--server")
    if engine is not None and engine != "llamacpp":
        raise typer.BadParameter(
            "the only engine treadle starts is llamacpp", param_hint="--engine"
        )
    report = run_calibration(
        server=server,
        engine=engine,
        profile=profile,
        model=model,
        dialect=dialect,
        quick=quick,
        seed=seed,
        echo=console.print,
        nice=nice,
    )
    v = report.validation
    fit = report.fit
    console.print(
        f"fit: mfu {fit['mfu']:.4f}  attention_mfu {fit['attention_mfu']:.4f}  "
        f"mbu {fit['mbu']:.4f}  kv_mbu {fit['kv_mbu']:.4f}  "
        f"query tile {round(fit.get('attention_query_tile', 0)) or 'chunk'}  "
        f"step overhead {fit['step_overhead_s'] * 1e3:.3f} ms  "
        f"request overhead {fit['request_overhead_s'] * 1e3:.3f} ms  "
        f"(fit error {fit['fit_mape']:.1%})",
        highlight=False,
    )
    console.print(
        f"held-back mix ({v['requests']} requests): TTFT error {v['ttft_mape']:.1%}, "
        f"decode error {v['decode_mape']:.1%} (mean absolute percentage, against each "
        f"request's median of {v.get('replays', 1)} replays)",
        highlight=False,
    )
    if "ttft_mape_each_replay" in v:
        each = ", ".join(
            f"{t:.0%}/{d:.0%}"
            for t, d in zip(v["ttft_mape_each_replay"], v["decode_mape_each_replay"], strict=True)
        )
        console.print(
            f"each replay's TTFT/decode error: {each}; replays' spread (slowest - fastest) / "
            f"median: TTFT {v.get('ttft_spread_p50', math.nan):.0%}, decode "
            f"{v.get('decode_spread_p50', math.nan):.0%}; probes' spread over passes: "
            f"{v.get('probe_spread_p50', math.nan):.0%} median, "
            f"{v.get('probe_spread_max', math.nan):.0%} largest",
            highlight=False,
        )
    if out is not None:
        out.write_text(report.profile.model_dump_json(indent=2, exclude_none=True) + "\n")
        console.print(f"profile written to {out}")
    if json_path is not None:
        import json

        json_path.write_text(json.dumps(report.as_json(), indent=2) + "\n")
