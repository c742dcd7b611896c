"""`treadle bench gateway`: what `treadle gateway` adds to a call's latency.

The simulator server (`treadle sim serve`, one replica) and the gateway (`treadle gateway`
in front of it) run as processes of their own; this process is the client. At each
concurrency level (`--streams 1,10,100,500`: that many clients, each sending streamed
chat calls back to back) the same calls go `direct` to the simulator and through the
`gateway`, in alternating batches (`--repeats`, which path goes first alternating too), so
both paths see the same machine state; per level the samples of each path are pooled.

Measured per call, from the client: TTFT = send → first byte of the answer's body (the
simulator sends its first event when the first token is out) and total = send → end of
the stream. Added latency = the gateway path's percentile − the direct path's, for p50
and p99. The gateway runs with a fixed in-flight limit above the highest level
(`--max-in-flight`), so it queues nothing: what is measured is its cost (parsing,
scheduling, routing, the extra hop, passing the stream through), not scheduling delay.

The report (`--json`) has `results.added_ttft_ms["<streams>"] = {"p50", "p99"}`, the same
for `added_total_ms`, and the raw percentiles of each path (`direct`, `gateway`). A call
whose pooled connection the server had just closed (a read error before any byte: a
keep-alive race of the client, not the path) is sent again on a new connection and timed
from then; each path counts those (`resent_on_a_new_connection`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from treadle.benchmarks.common import percentile, print_table, write_report
from treadle.testing.processes import free_port, wait_port

MODEL = "sim-bench"
PATHS = ("direct", "gateway")


class _Process:
    """A `treadle ...` command in a process of its own, stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = [sys.executable, "-m", "treadle.cli.main", *args]
        self.log = log
        self.proc: Any = None

    def start(self, port: int, what: str) -> None:
        import subprocess

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        wait_port(port, what, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


@contextlib.contextmanager
def _servers(workdir: Path, *, speed: float, max_in_flight: int) -> Iterator[tuple[str, str, int]]:
    sim_port, gw_port = free_port(), free_port()
    sim = _Process(
        ["sim", "serve", "--port", str(sim_port), "--speed", str(speed), "--model", MODEL,
         "--log-level", "warning"],
        workdir / "sim.log",
    )  # fmt: skip
    gateway = _Process(
        ["gateway", "--port", str(gw_port), "--replica", f"http://127.0.0.1:{sim_port}/v1",
         "--dialect", "sim", "--model", MODEL, "--max-in-flight", str(max_in_flight),
         "--log-level", "warning"],
        workdir / "gateway.log",
    )  # fmt: skip
    try:
        sim.start(sim_port, "the simulator server")
        gateway.start(gw_port, "treadle gateway")
        yield (
            f"http://127.0.0.1:{sim_port}/v1",
            f"http://127.0.0.1:{gw_port}/v1",
            gateway.proc.pid,
        )
    finally:
        gateway.stop()
        sim.stop()


async def _one(
    client: httpx.AsyncClient, url: str, body: bytes, resent: list[int]
) -> tuple[float, float]:
    """One streamed call: (TTFT s, total s). A call whose pooled connection the server had
    closed (a read error before any byte) is sent again on a new one and timed from then;
    `resent` counts those."""
    headers = {"content-type": "application/json"}
    for attempt in range(3):
        start = time.perf_counter()
        ttft = None
        try:
            async with client.stream("POST", url, content=body, headers=headers) as r:
                if r.status_code != 200:
                    raw = (await r.aread())[:200]
                    raise RuntimeError(f"{url} answered {r.status_code}: {raw!r}")
                async for _ in r.aiter_raw():
                    if ttft is None:
                        ttft = time.perf_counter() - start
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if ttft is not None or attempt == 2:
                raise
            resent[0] += 1
            continue
        total = time.perf_counter() - start
        return (ttft if ttft is not None else total), total
    raise AssertionError("unreachable")


async def _batch(
    client: httpx.AsyncClient,
    url: str,
    streams: int,
    calls: int,
    tokens: int,
    on_call: Any,
    resent: list[int],
) -> list[tuple[float, float]]:
    """`streams` clients share `calls` calls, each sending its next when one finishes."""
    samples: list[tuple[float, float]] = []
    remaining = [calls]
    chat = url + "/chat/completions"

    async def worker(w: int) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            n = remaining[0]
            body = orjson.dumps(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"call {n} of {w}"}],
                    "max_tokens": tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
            samples.append(await _one(client, chat, body, resent))
            on_call()

    async with anyio.create_task_group() as tg:
        for w in range(streams):
            tg.start_soon(worker, w)
    return samples


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) process `pid` has used (Linux `/proc`; 0 elsewhere)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nothing() -> None:
    return None


def _pct(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99)}


async def _bench(
    urls: dict[str, str], levels: list[int], *, calls_per_stream: int, min_calls: int,
    repeats: int, tokens: int, console: Console, gateway_pid: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"added_ttft_ms": {}, "added_total_ms": {}, "direct": {}, "gateway": {}}
    room = max(levels) + 16
    # idle connections go before the servers' 5 s keep-alive closes them (the other
    # path's batch can take longer than that)
    limits = httpx.Limits(
        max_connections=room, max_keepalive_connections=room, keepalive_expiry=3.0
    )
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for path in PATHS:  # warm up connections and both servers
            await _batch(client, urls[path], min(16, max(levels)), 64, tokens, _nothing, [0])
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        ) as progress:  # fmt: skip
            for streams in levels:
                calls = max(min_calls, streams * calls_per_stream)
                task = progress.add_task(f"{streams:>4} streams", total=2 * repeats * calls)
                pooled: dict[str, list[tuple[float, float]]] = {p: [] for p in PATHS}
                resent = {p: [0] for p in PATHS}
                gateway_cpu = 0.0
                for rep in range(repeats):
                    order = PATHS if rep % 2 == 0 else PATHS[::-1]
                    for path in order:
                        cpu_before = _cpu_s(gateway_pid)
                        pooled[path] += await _batch(
                            client, urls[path], streams, calls, tokens,
                            lambda t=task: progress.advance(t), resent[path],
                        )  # fmt: skip
                        if path == "gateway":
                            gateway_cpu += _cpu_s(gateway_pid) - cpu_before
                key = str(streams)
                for path in PATHS:
                    out[path][key] = {
                        "calls": len(pooled[path]),
                        "resent_on_a_new_connection": resent[path][0],
                        "ttft_ms": _pct([s[0] for s in pooled[path]]),
                        "total_ms": _pct([s[1] for s in pooled[path]]),
                    }
                # the gateway process's CPU per call it passed on (user + system)
                out["gateway"][key]["cpu_ms_per_call"] = 1000 * gateway_cpu / len(pooled["gateway"])
                for metric in ("ttft_ms", "total_ms"):
                    d, g = out["direct"][key][metric], out["gateway"][key][metric]
                    out[f"added_{metric}"][key] = {q: g[q] - d[q] for q in ("p50", "p99")}
    return out


def main(
    streams: Annotated[
        str, typer.Option(help="Concurrency levels, comma-separated (streams at once).")
    ] = "1,10,100,500",
    calls_per_stream: Annotated[int, typer.Option(min=1, help="Calls per stream per batch.")] = 2,
    min_calls: Annotated[int, typer.Option(min=1, help="Calls per batch, at least.")] = 200,
    repeats: Annotated[int, typer.Option(min=1, help="Batches per path and level.")] = 3,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 16,
    speed: Annotated[
        float, typer.Option(min=0.01, help="The simulator's speed (simulated s per real s).")
    ] = 20.0,
    quick: Annotated[bool, typer.Option(help="A short smoke run (CI).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Latency the gateway adds (TTFT and total), against the simulator server direct."""
    try:
        levels = sorted({int(s) for s in streams.split(",") if s.strip()})
    except ValueError:
        raise typer.BadParameter("use numbers, e.g. 1,10,100,500", param_hint="--streams") from None
    if not levels or levels[0] < 1:
        raise typer.BadParameter("levels must be >= 1", param_hint="--streams")
    if quick:
        levels, min_calls, repeats, calls_per_stream = [1, 10], 20, 1, 1
    console = Console(stderr=True)
    config = {
        "streams": levels, "calls_per_stream": calls_per_stream, "min_calls": min_calls,
        "repeats": repeats, "tokens": tokens, "speed": speed, "cpus": os.cpu_count(),
        "gateway_max_in_flight": 2 * max(levels) + 64,  # above every level: no queueing
        "processes": "simulator server, gateway, client: one each",
    }  # fmt: skip
    limit = 2 * max(levels) + 64
    with (
        tempfile.TemporaryDirectory(prefix="treadle-bench-gateway-") as tmp,
        _servers(Path(tmp), speed=speed, max_in_flight=limit) as (direct, gateway, gw_pid),
    ):
        urls = {"direct": direct, "gateway": gateway}

        async def measure() -> dict[str, Any]:
            return await _bench(
                urls, levels, calls_per_stream=calls_per_stream, min_calls=min_calls,
                repeats=repeats, tokens=tokens, console=console, gateway_pid=gw_pid,
            )  # fmt: skip

        results = _run(measure)
    rows = []
    for level in levels:
        key = str(level)
        d, g = results["direct"][key], results["gateway"][key]
        rows.append([
            level, d["ttft_ms"]["p50"], g["ttft_ms"]["p50"], results["added_ttft_ms"][key]["p50"],
            d["ttft_ms"]["p99"], g["ttft_ms"]["p99"], results["added_ttft_ms"][key]["p99"],
            results["added_total_ms"][key]["p50"], results["added_total_ms"][key]["p99"],
            g["cpu_ms_per_call"],
        ])  # fmt: skip
    columns = ["streams", "TTFT p50 direct", "via gateway", "added", "TTFT p99 direct",
               "via gateway", "added", "total added p50", "total added p99",
               "gateway CPU ms/call"]  # fmt: skip
    print_table("treadle bench gateway (ms)", columns, rows, console=Console(width=160))
    top = str(levels[-1])
    ratios = {
        f"ttft_p50_gateway_over_direct_at_{top}": results["gateway"][top]["ttft_ms"]["p50"]
        / results["direct"][top]["ttft_ms"]["p50"],
        f"ttft_p99_gateway_over_direct_at_{top}": results["gateway"][top]["ttft_ms"]["p99"]
        / results["direct"][top]["ttft_ms"]["p99"],
    }
    write_report(json_path, "gateway", config, results, ratios)


def _run(fn: Any) -> Any:
    """Run `fn` on uvloop when installed (the client should cost as little as it can)."""
    import asyncio
    import importlib.util

    factory = None
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(fn())
