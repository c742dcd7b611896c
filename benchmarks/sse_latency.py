"""`treadle bench sse`: how late a run's events reach a client of the daemon's event
stream (docs/benchmarks.md).

A private `redis-server` (append-only, `appendfsync always`, as in production) and the
daemon (`treadle serve`, with its worker in the same process) run as processes of their
own; this process submits `--runs` runs at once and follows each run's events (SSE), one
stream per run. A run is a chain of `--steps` LLM nodes on the in-process simulated engine
(`backend: sim`: real-time prefill and decode, tokens streamed), so there are node events,
token batches and long stretches between commits.

Latency of an event = when the client parsed it (`time.time()`) − its `ts` (the worker's
`time.time()` when the event was emitted); both processes read the same clock. Two systems,
each on its own fresh daemon:
- `live`: workers write each event to the run's live stream as it happens (the default);
- `journal`: `--no-live-events`: the stream follows the journal only, which is written
  when a node commits (how the daemon behaved before live events).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import typer
from rich.console import Console

from treadle.benchmarks.common import percentile, print_table, write_report
from treadle.testing.processes import DaemonProcess, RedisServer, free_port, wait_port


def workflow(steps: int, tokens: int) -> str:
    answer = " ".join(f"w{i}" for i in range(tokens))
    lines = [
        "name: chain",
        "inputs:",
        "  topic: str",
        "models:",
        f'  default: {{backend: sim, rules: [{{match: ".", content: "{answer}"}}]}}',
        "nodes:",
        '  - {id: s0, kind: llm, prompt: "Start on {t}", inputs: {t: $input.topic}}',
    ]
    for i in range(1, steps):
        lines.append(
            f'  - {{id: s{i}, kind: llm, prompt: "Go on from {{x}}", inputs: {{x: $s{i - 1}}}}}'
        )
    lines += ["outputs:", f"  text: $s{steps - 1}"]
    return "\n".join(lines) + "\n"


async def _follow(client: httpx.AsyncClient, run_id: str, out: list[tuple[str, float]]) -> None:
    """Read the run's stream to its end; (kind, latency s) of each event into `out`."""
    async with client.stream("GET", f"/v1/runs/{run_id}/events") as resp:
        resp.raise_for_status()
        buffer = ""
        async for chunk in resp.aiter_text():
            now = time.time()
            buffer += chunk
            *messages, buffer = buffer.split("\n\n")
            for message in messages:
                data = next((line[6:] for line in message.splitlines()
                             if line.startswith("data: ")), None)  # fmt: skip
                if data is not None:
                    event = json.loads(data)
                    out.append((event["kind"], now - event["ts"]))


async def _system(
    name: str, live: bool, *, runs: int, steps: int, tokens: int, workdir: Path
) -> dict[str, Any]:
    from treadle.runtime.daemon.keys import DaemonKeys
    from treadle.runtime.daemon.tenants import TenantStore
    from treadle.runtime.stores.redis import connect

    redis = RedisServer(workdir / f"redis-{name}", appendonly=True)
    redis.start()
    port = free_port()
    args = ["serve", "--redis", redis.url, "--port", str(port), "--log-level", "warning"]
    api = DaemonProcess([*args, "--live-events" if live else "--no-live-events"],
                        workdir / f"serve-{name}.log")  # fmt: skip
    admin = connect(redis.url)
    try:
        tenants = TenantStore(admin, DaemonKeys())
        await tenants.create("bench", max_concurrent_runs=10_000)
        key = (await tenants.issue_key("bench")).token
        api.start()
        assert api.proc is not None
        await anyio.to_thread.run_sync(wait_port, port, "the daemon", api.proc)
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=runs + 8)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                     timeout=120, limits=limits) as client:  # fmt: skip
            made = await client.post("/v1/workflows", json={"definition": workflow(steps, tokens)})
            made.raise_for_status()
            samples: list[tuple[str, float]] = []
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(runs):
                    resp = await client.post(
                        "/v1/runs", json={"workflow": "chain", "inputs": {"topic": f"t{i}"}}
                    )
                    resp.raise_for_status()
                    tg.start_soon(_follow, client, resp.json()["run_id"], samples)
            elapsed = time.perf_counter() - started
    finally:
        api.stop()
        with contextlib.suppress(Exception):
            await admin.aclose()
        redis.stop()
    ms = [1000 * lat for _kind, lat in samples]
    started_ms = [1000 * lat for kind, lat in samples if kind == "node_started"]
    tokens_ms = [1000 * lat for kind, lat in samples if kind == "llm_tokens"]
    return {
        "events": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p90_ms": percentile(ms, 0.9),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms, default=float("nan")),
        "node_started_p50_ms": percentile(started_ms, 0.5),
        "node_started_p99_ms": percentile(started_ms, 0.99),
        "llm_tokens_p50_ms": percentile(tokens_ms, 0.5),
        "llm_tokens_p99_ms": percentile(tokens_ms, 0.99),
        "wall_s": elapsed,
    }


def main(
    runs: Annotated[int, typer.Option(help="Runs at once, each followed by its own stream.")] = 20,
    steps: Annotated[int, typer.Option(help="LLM nodes per run (a chain).")] = 4,
    tokens: Annotated[int, typer.Option(help="Tokens each LLM answer streams.")] = 120,
    baseline: Annotated[
        bool, typer.Option(help="Also run the journal-only baseline (--no-live-events).")
    ] = True,
    quick: Annotated[bool, typer.Option(help="A short smoke run (CI).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Event-stream latency: event emitted by a worker → received by an SSE client."""
    if quick:
        runs, steps, tokens = min(runs, 4), min(steps, 2), min(tokens, 40)
    systems = [("live", True)] + ([("journal", False)] if baseline else [])
    config = {"runs": runs, "steps": steps, "tokens": tokens, "cpus": os.cpu_count(),
              "redis": "private, appendonly yes, appendfsync always"}  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="treadle-bench-sse-") as tmp:
        for name, live in systems:
            results[name] = anyio.run(
                lambda name=name, live=live: _system(
                    name, live, runs=runs, steps=steps, tokens=tokens, workdir=Path(tmp)
                )
            )
    columns = ["system", "events", "p50 ms", "p90 ms", "p99 ms", "max ms",
               "node_started p50", "node_started p99", "tokens p50", "tokens p99"]  # fmt: skip
    rows = [[name, r["events"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"],
             r["node_started_p50_ms"], r["node_started_p99_ms"], r["llm_tokens_p50_ms"],
             r["llm_tokens_p99_ms"]] for name, r in results.items()]  # fmt: skip
    print_table("treadle bench sse: event emitted → received (ms)", columns, rows,
                console=Console(width=max(120, Console().width)))  # fmt: skip
    ratios = {}
    if "journal" in results:
        ratios["p50_journal_over_live"] = results["journal"]["p50_ms"] / results["live"]["p50_ms"]
    write_report(json_path, "sse", config, results, ratios)
