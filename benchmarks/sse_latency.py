"""`treadle bench sse`: how late a run's events reach a client of the daemon's event
stream (docs/web-view.md).

A private `redis-server` (append-only, `appendfsync always`, as in production) and the
daemon (`treadle serve`, its worker in the same process) run as processes of their own;
this process submits `--runs` runs at once and follows each of them twice:

- `live` (treadle): the run's event stream, `GET /v1/runs/{id}/events` (SSE), which
  sends events as workers publish them;
- `journal` (the baseline: how the event stream worked before live events): a blocking
  `XREAD` on the run's journal, which gets events when a node's output is committed.

A run is a chain of `--steps` LLM nodes on the in-process simulated engine (`backend:
sim`: real-time prefill and decode, tokens streamed), so there are node events, token
batches and long stretches between commits. Latency of an event = when the client parsed
it (`time.time()`) − its `ts` (the worker's `time.time()` when it was emitted); every
process reads the same clock.
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


async def _follow_sse(client: httpx.AsyncClient, run_id: str, out: list[tuple[str, float]]) -> None:
    """Read the run's event stream to its end: (kind, latency s) of each event."""
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


async def _follow_journal(redis: Any, key: str, out: list[tuple[str, float]]) -> None:
    """Follow a run's journal with blocking reads, as the event stream did before live
    events, until its `run_finished`: (kind, latency s) of each event."""
    last = "0-0"
    while True:
        resp: Any = await redis.xread({key: last}, count=500, block=5000)
        now = time.time()
        for _key, entries in resp.items() if isinstance(resp, dict) else resp or []:
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields[b"e"])
                out.append((event["kind"], now - event["ts"]))
                if event["kind"] == "run_finished":
                    return


def _summary(samples: list[tuple[str, float]]) -> dict[str, Any]:
    ms = [1000 * lat for _kind, lat in samples]
    started = [1000 * lat for kind, lat in samples if kind == "node_started"]
    tokens = [1000 * lat for kind, lat in samples if kind == "llm_tokens"]
    return {
        "events": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p90_ms": percentile(ms, 0.9),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms, default=float("nan")),
        "node_started_p50_ms": percentile(started, 0.5),
        "node_started_p99_ms": percentile(started, 0.99),
        "llm_tokens_p50_ms": percentile(tokens, 0.5),
        "llm_tokens_p99_ms": percentile(tokens, 0.99),
    }


async def _bench(*, runs: int, steps: int, tokens: int, workdir: Path) -> dict[str, Any]:
    from treadle.runtime.daemon.keys import DaemonKeys
    from treadle.runtime.daemon.tenants import TenantStore
    from treadle.runtime.stores.redis import RedisKeys, connect

    redis = RedisServer(workdir / "redis", appendonly=True)
    redis.start()
    port = free_port()
    # one tenant follows every run at once: its per-tenant limits (16 streams by default)
    # are sized to the load, since what is measured here is latency, not the limits
    api = DaemonProcess(["serve", "--redis", redis.url, "--port", str(port),
                         "--tenant-event-streams", str(runs), "--tenant-in-flight",
                         str(2 * runs + 8), "--tenant-rate", "0",
                         "--log-level", "warning"], workdir / "serve.log")  # fmt: skip
    admin = connect(redis.url, max_connections=runs + 8)
    live: list[tuple[str, float]] = []
    journal: list[tuple[str, float]] = []
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
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(runs):
                    resp = await client.post(
                        "/v1/runs", json={"workflow": "chain", "inputs": {"topic": f"t{i}"}}
                    )
                    resp.raise_for_status()
                    run_id = resp.json()["run_id"]
                    tg.start_soon(_follow_sse, client, run_id, live)
                    tg.start_soon(_follow_journal, admin, RedisKeys().events(run_id), journal)
            elapsed = time.perf_counter() - started
    finally:
        api.stop()
        with contextlib.suppress(Exception):
            await admin.aclose()
        redis.stop()
    return {
        "live": {**_summary(live), "wall_s": elapsed},
        "journal": {**_summary(journal), "wall_s": elapsed},
    }


def main(
    runs: Annotated[int, typer.Option(help="Runs at once, each followed by its own stream.")] = 20,
    steps: Annotated[int, typer.Option(help="LLM nodes per run (a chain).")] = 4,
    tokens: Annotated[int, typer.Option(help="Tokens each LLM answer streams.")] = 120,
    quick: Annotated[bool, typer.Option(help="A short smoke run (CI).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Event-stream latency: event emitted by a worker → received by a client."""
    if quick:
        runs, steps, tokens = min(runs, 4), min(steps, 2), min(tokens, 40)
    config = {"runs": runs, "steps": steps, "tokens": tokens, "cpus": os.cpu_count(),
              "redis": "private, appendonly yes, appendfsync always"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="treadle-bench-sse-") as tmp:
        workdir = Path(tmp)

        async def measure() -> dict[str, Any]:
            return await _bench(runs=runs, steps=steps, tokens=tokens, workdir=workdir)

        results = anyio.run(measure)
    columns = ["system", "events", "p50 ms", "p90 ms", "p99 ms", "max ms",
               "node_started p50", "node_started p99", "tokens p50", "tokens p99"]  # fmt: skip
    rows = [[name, r["events"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"],
             r["node_started_p50_ms"], r["node_started_p99_ms"], r["llm_tokens_p50_ms"],
             r["llm_tokens_p99_ms"]] for name, r in results.items()]  # fmt: skip
    print_table("treadle bench sse: event emitted → received (ms)", columns, rows,
                console=Console(width=max(120, Console().width)))  # fmt: skip
    ratios = {
        "p50_journal_over_live": results["journal"]["p50_ms"] / results["live"]["p50_ms"],
        "p99_journal_over_live": results["journal"]["p99_ms"] / results["live"]["p99_ms"],
    }
    write_report(json_path, "sse", config, results, ratios)
