"""`treadle bench service`: the daemon under load and faults (docs/benchmarks.md).

K tenants submit runs of a small 5-node workflow (scripted backend) through the HTTP API,
at a fixed rate (open loop: a request is sent on schedule whether or not earlier ones have
been answered), to W worker processes on a real Redis. Everything runs as separate
processes on this machine: a private `redis-server` (append-only file, `appendfsync
always`) unless `--redis-url` is given, the API (`treadle serve --no-worker`), the workers
(`treadle worker`), and this process as the load generator.

Phases (each followed by a drain: waiting until every accepted run is terminal):
- `full`: `--rate` runs/s for `--duration` s;
- `half`: half that rate (the API latency target is for this phase);
- `faults` (with `--kill-every` and/or `--restart-redis`; always with `--quick`):
  `--fault-rate` runs/s (default half the rate) while a worker is SIGKILLed (and restarted
  at once) every `--kill-every` s, and Redis is SIGKILLed and restarted once, half-way (its
  append-only file is fsynced on every write, so nothing it acknowledged is lost).

Metrics per phase:
- `runs_per_s`: runs that succeeded, over the time from the phase's first submission to
  its last completion (the offered rate when the system keeps up, its capacity when not);
- `drain_s`: how long after the last submission the last run finished (a backlog);
- `api_p50_ms` / `api_p99_ms`: client-side latency of every API request of the phase, a
  submission's counted from when it was due (so queueing in front of a slow API counts);
- `runs_lost`: accepted runs (201) that never reached a terminal state (or vanished);
- `duplicate_completions`: node executions repeated beyond the at-least-once rule, from
  the journals: a node instance that finished more than once in one run;
- `cross_tenant_reads_allowed`: reads of other tenants' runs (every 10th submit also
  tries one; GET run and GET events) that were not refused with 404 (must be 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import h11
import httpx
import typer
from redis.exceptions import RedisError
from rich.console import Console

from treadle.benchmarks.common import percentile, print_table, write_report
from treadle.runtime.core.events import NodeFinished, RunStarted
from treadle.runtime.core.store import TERMINAL
from treadle.runtime.stores import codec
from treadle.testing.processes import (
    DaemonProcess,
    RedisServer,
    RedisUnavailable,
    free_port,
    wait_port,
)

WORKFLOW = """\
name: five
description: Outline, expand twice, merge, title (the service benchmark's workflow).
inputs:
  topic: str
models:
  default: {backend: scripted}
nodes:
  - {id: outline, kind: llm, prompt: "Outline {topic}", inputs: {topic: $input.topic}}
  - {id: part1, kind: llm, prompt: "Expand part one of {o}", inputs: {o: $outline}}
  - {id: part2, kind: llm, prompt: "Expand part two of {o}", inputs: {o: $outline}}
  - {id: merge, kind: llm, prompt: "Merge {a} and {b}", inputs: {a: $part1, b: $part2}}
  - {id: title, kind: llm, prompt: "Title for {m}", inputs: {m: $merge}}
outputs:
  title: $title
"""
NODES = 5
PREFIX = "treadle"
CROSS_EVERY = 10  # every Nth submit also tries to read another tenant's run
#: what a request on a broken connection raises
CONNECTION_ERRORS = (OSError, anyio.EndOfStream, anyio.BrokenResourceError, h11.ProtocolError)


# -- processes -------------------------------------------------------------------------


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc; 0 elsewhere)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU used by each part of the system during a phase. A part whose processes were
    restarted meanwhile (fault injection) reports None: its dead processes' time is gone."""

    def __init__(self, parts: dict[str, list[Any]]) -> None:
        self.parts = parts
        self.start = self._sample()

    @staticmethod
    def _pid(proc: Any) -> int | None:
        if proc == "self":
            return os.getpid()
        popen = getattr(proc, "proc", None)
        return popen.pid if popen is not None else None

    def _sample(self) -> dict[str, tuple[tuple[int | None, ...], float]]:
        out = {}
        for name, procs in self.parts.items():
            pids = tuple(self._pid(p) for p in procs)
            out[name] = (pids, sum(_cpu_s(pid) for pid in pids))
        return out

    def used(self) -> dict[str, float | None]:
        end = self._sample()
        return {
            name: (cpu - self.start[name][1]) if pids == self.start[name][0] else None
            for name, (pids, cpu) in end.items()
        }


# -- load ------------------------------------------------------------------------------


@dataclass
class _Phase:
    name: str
    rate: float
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: dict[str, str] = field(default_factory=dict)  # run id -> tenant
    client_errors: int = 0
    submits: int = 0
    cross_attempts: int = 0
    cross_allowed: int = 0
    worker_kills: int = 0
    redis_restarts: int = 0
    started: float = 0.0
    ended: float = 0.0


class _Connection:
    """One keep-alive HTTP/1.1 connection, spoken with h11 (the HTTP library under httpx)
    over an anyio stream. The load generator shares two cores with the system it measures,
    and httpx's connection pool costs several milliseconds of CPU per request once hundreds
    of requests wait on it; a fixed set of plain connections costs a fraction of that."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: Any = None
        self._h11: h11.Connection | None = None

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        if self._stream is None or self._h11 is None:
            self._stream = await anyio.connect_tcp(self.host, self.port)
            self._h11 = h11.Connection(h11.CLIENT)
        conn = self._h11
        head = [("host", f"{self.host}:{self.port}"), ("content-length", str(len(body))),
                *headers.items()]  # fmt: skip
        try:
            data = conn.send(h11.Request(method=method, target=target, headers=head)) or b""
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await self._stream.send(data)
            status = 0
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self._stream.receive(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            conn.start_next_cycle()
            return status, b"".join(chunks)
        except CONNECTION_ERRORS:
            await self.close()
            raise

    async def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()
        self._stream, self._h11 = None, None


class _Load:
    """Open-loop load: submissions are scheduled at the phase's rate and handed to a fixed
    set of connections; a request's latency counts from its SCHEDULED time, so time spent
    waiting for a free connection (a slow API) is measured, not hidden."""

    def __init__(self, url: str, keys: dict[str, str], seed: int, connections: int = 64):
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.keys = keys
        self.tenants = list(keys)
        self.rng = random.Random(seed)
        self.connections = connections
        self.counter = 0

    async def register(self, tenant: str, definition: str) -> None:
        conn = _Connection(self.host, self.port)
        body = json.dumps({"definition": definition}).encode()
        headers = {**self._auth(tenant), "content-type": "application/json"}
        status, text = await conn.request("POST", "/v1/workflows", headers, body)
        await conn.close()
        if status != 201:
            raise RuntimeError(f"registering for {tenant}: {status} {text[:300]!r}")

    async def run_phase(self, phase: _Phase) -> None:
        phase.started = time.time()
        start = time.perf_counter()
        total = int(phase.rate * phase.duration_s)
        send, receive = anyio.create_memory_object_stream[float](max_buffer_size=total + 1)
        async with anyio.create_task_group() as tg:
            for _ in range(self.connections):
                tg.start_soon(self._connection_loop, phase, receive.clone())
            receive.close()
            async with send:
                for i in range(total):
                    due = start + i / phase.rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    send.send_nowait(due)
                phase.ended = time.time()  # the last request is due: the window closes

    async def _connection_loop(self, phase: _Phase, due_times: Any) -> None:
        conn = _Connection(self.host, self.port)
        try:
            async with due_times:
                async for due in due_times:
                    await self._submit(phase, conn, due)
        finally:
            await conn.close()

    async def _request(
        self, phase: _Phase, conn: _Connection, method: str, target: str, tenant: str,
        body: bytes = b"", since: float | None = None,
    ) -> tuple[int, bytes] | None:  # fmt: skip
        sent = time.perf_counter() if since is None else since
        headers = self._auth(tenant)
        if body:
            headers["content-type"] = "application/json"
        try:
            status, data = await conn.request(method, target, headers, body)
        except CONNECTION_ERRORS:
            phase.client_errors += 1
            return None
        phase.latencies.append(time.perf_counter() - sent)
        phase.statuses[status] += 1
        return status, data

    async def _submit(self, phase: _Phase, conn: _Connection, due: float) -> None:
        self.counter += 1
        phase.submits += 1
        n = self.counter
        tenant = self.tenants[n % len(self.tenants)]
        body = json.dumps({"workflow": "five", "inputs": {"topic": f"topic {n % 997}"}}).encode()
        answer = await self._request(phase, conn, "POST", "/v1/runs", tenant, body, since=due)
        if answer is not None and answer[0] == 201:
            phase.accepted[json.loads(answer[1])["run_id"]] = tenant
        if n % CROSS_EVERY == 0 and len(phase.accepted) > 1:
            await self._cross_read(phase, conn, tenant)

    async def _cross_read(self, phase: _Phase, conn: _Connection, reader: str) -> None:
        # somebody else's run: it exists, so anything but a 404 would be a leak
        for run_id, owner in self.rng.sample(list(phase.accepted.items()), 2):
            if owner == reader:
                continue
            for target in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events?follow=false"):
                answer = await self._request(phase, conn, "GET", target, reader)
                if answer is None:
                    continue
                phase.cross_attempts += 1
                if answer[0] != 404:
                    phase.cross_allowed += 1
            return

    def _auth(self, tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant]}"}


# -- faults ----------------------------------------------------------------------------


async def _inject_faults(
    phase: _Phase,
    workers: list[DaemonProcess],
    redis: RedisServer | None,
    kill_every: float | None,
    restart_redis: bool,
    rng: random.Random,
) -> None:
    begun = time.perf_counter()
    restart_at = phase.duration_s / 2 if restart_redis and redis is not None else None
    next_kill = kill_every
    while True:
        elapsed = time.perf_counter() - begun
        if elapsed >= phase.duration_s:
            return
        if restart_at is not None and elapsed >= restart_at:
            assert redis is not None
            redis.kill()
            await anyio.sleep(0.5)
            redis.start()
            phase.redis_restarts += 1
            restart_at = None
        if next_kill is not None and elapsed >= next_kill:
            victim = rng.choice(workers)
            victim.kill()
            victim.start()
            phase.worker_kills += 1
            next_kill += kill_every or 0
        await anyio.sleep(0.05)


# -- results ---------------------------------------------------------------------------


async def _records(client: Any, run_ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in range(0, len(run_ids), 500):
        chunk = run_ids[i : i + 500]
        async with client.pipeline(transaction=False) as pipe:
            for run_id in chunk:
                pipe.hget(f"{PREFIX}:{{{run_id}}}:meta", "data")
            raws = await pipe.execute()
        for run_id, raw in zip(chunk, raws, strict=True):
            out[run_id] = codec.decode_record(raw) if raw is not None else None
    return out


async def _drain(client: Any, phase: _Phase, timeout_s: float) -> dict[str, Any]:
    """Wait until every accepted run is terminal (or the timeout); their records."""
    deadline = time.monotonic() + timeout_s
    ids = list(phase.accepted)
    while True:
        try:
            records = await _records(client, ids)
        except (RedisError, OSError):
            await anyio.sleep(0.5)
            continue
        done = all(r is not None and r.status in TERMINAL for r in records.values())
        if done or time.monotonic() > deadline:
            return records
        await anyio.sleep(0.25)


async def _journal_stats(client: Any, run_ids: list[str]) -> tuple[int, int]:
    """(node completions repeated, runs resumed) over the runs' journals."""
    repeated = 0
    resumed = 0
    for i in range(0, len(run_ids), 200):
        chunk = run_ids[i : i + 200]
        async with client.pipeline(transaction=False) as pipe:
            for run_id in chunk:
                pipe.xrange(f"{PREFIX}:{{{run_id}}}:events", "-", "+")
            streams = await pipe.execute()
        for entries in streams:
            events = [codec.decode_event(fields[b"e"]) for _id, fields in entries]
            counts = Counter(e.node for e in events if isinstance(e, NodeFinished))
            repeated += sum(c - 1 for c in counts.values() if c > 1)
            resumed += any(isinstance(e, RunStarted) and e.resumed for e in events)
    return repeated, resumed


def _summarize(
    phase: _Phase, records: dict[str, Any], repeated: int, resumed: int
) -> dict[str, Any]:
    finished = {rid: r for rid, r in records.items() if r is not None and r.status in TERMINAL}
    succeeded = [r for r in finished.values() if r.status == "succeeded"]
    last = max((r.updated_at for r in finished.values()), default=phase.ended)
    # all the phase's runs over the time they took: the offered rate when the system keeps
    # up, its capacity when a backlog builds (drain_s then says how far behind it fell)
    elapsed = max(phase.duration_s, last - phase.started)
    return {
        "offered_rate": phase.rate,
        "submitted": phase.submits,
        "accepted": len(phase.accepted),
        "refused": {str(k): v for k, v in sorted(phase.statuses.items()) if k >= 400 and k != 404},
        "client_errors": phase.client_errors,
        "succeeded": len(succeeded),
        "failed": sum(1 for r in finished.values() if r.status == "failed"),
        "runs_per_s": len(succeeded) / elapsed,
        "drain_s": max(0.0, last - phase.ended),
        "api_p50_ms": percentile(phase.latencies, 0.5) * 1000,
        "api_p99_ms": percentile(phase.latencies, 0.99) * 1000,
        "runs_lost": len(records) - len(finished),
        "duplicate_completions": repeated,
        "resumed_runs": resumed,
        "cross_tenant_reads": phase.cross_attempts,
        "cross_tenant_reads_allowed": phase.cross_allowed,
        "worker_kills": phase.worker_kills,
        "redis_restarts": phase.redis_restarts,
    }


# -- the command -----------------------------------------------------------------------


async def _bench(
    *,
    tenants: int,
    workers: int,
    rate: float,
    duration: float,
    kill_every: float | None,
    restart_redis: bool,
    fault_rate: float | None,
    redis_url: str | None,
    concurrency: int,
    lease_ms: int,
    seed: int,
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    from treadle.runtime.daemon.keys import DaemonKeys
    from treadle.runtime.daemon.tenants import TenantStore
    from treadle.runtime.stores.redis import connect

    redis: RedisServer | None = None
    if redis_url is None:
        try:
            redis = RedisServer(workdir / "redis", appendonly=True)
        except RedisUnavailable as exc:
            raise typer.BadParameter(f"{exc}; give --redis-url instead") from None
        redis.start()
        redis_url = redis.url
    port = free_port()
    api = DaemonProcess(
        ["serve", "--no-worker", "--redis", redis_url, "--port", str(port),
         "--log-level", "warning"],
        workdir / "api.log",
    )  # fmt: skip
    worker_args = ["worker", "--redis", redis_url, "--concurrency", str(concurrency),
                   "--lease-ms", str(lease_ms), "--log-level", "warning"]  # fmt: skip
    pool = [DaemonProcess(worker_args, workdir / f"worker-{i}.log") for i in range(workers)]
    client = connect(redis_url)
    try:
        store = TenantStore(client, DaemonKeys(PREFIX))
        keys: dict[str, str] = {}
        stamp = int(time.time())
        for i in range(tenants):
            name = f"bench-{stamp}-{i}"
            await store.create(name, max_concurrent_runs=100_000)
            keys[name] = (await store.issue_key(name)).token
        api.start()
        assert api.proc is not None
        await anyio.to_thread.run_sync(wait_port, port, "the API", api.proc)
        for child in pool:
            child.start()
        url = f"http://127.0.0.1:{port}"
        load = _Load(url, keys, seed)
        for tenant in keys:
            await load.register(tenant, WORKFLOW)
        await anyio.sleep(1.5)  # the workers import and connect
        phases = [_Phase("full", rate, duration), _Phase("half", rate / 2, duration)]
        if kill_every is not None or restart_redis:
            phases.append(_Phase("faults", fault_rate or rate / 2, duration))
        results: dict[str, dict[str, Any]] = {}
        rng = random.Random(seed)
        for phase in phases:
            meter = _CpuMeter(
                {"api": [api], "workers": pool, "redis": [redis] if redis else [],
                 "load generator": ["self"]}
            )  # fmt: skip
            async with anyio.create_task_group() as tg:
                if phase.name == "faults":
                    tg.start_soon(
                        _inject_faults, phase, pool, redis, kill_every, restart_redis, rng
                    )
                await load.run_phase(phase)
            records = await _drain(client, phase, timeout_s=max(60.0, 3 * duration))
            repeated, resumed = await _journal_stats(client, list(phase.accepted))
            cpu = meter.used()
            results[phase.name] = _summarize(phase, records, repeated, resumed)
            done = max(1, results[phase.name]["succeeded"])
            results[phase.name]["cpu_ms_per_run"] = {
                k: (v * 1000 / done if v is not None else None) for k, v in cpu.items()
            }
        return results
    finally:
        for child in pool:
            child.stop()
        api.stop()
        with contextlib.suppress(Exception):
            await client.aclose()
        if redis is not None:
            redis.stop()


def main(
    tenants: Annotated[int, typer.Option(help="Tenants submitting runs.")] = 20,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    rate: Annotated[float, typer.Option(help="Runs submitted per second (full rate).")] = 200.0,
    duration: Annotated[float, typer.Option(help="Seconds of submissions per phase.")] = 20.0,
    kill_every: Annotated[
        float | None, typer.Option(help="Faults phase: SIGKILL a worker every this many s.")
    ] = None,
    restart_redis: Annotated[
        bool, typer.Option(help="Faults phase: SIGKILL and restart Redis once.")
    ] = False,
    fault_rate: Annotated[
        float | None, typer.Option(help="Runs/s during the faults phase (default: rate / 2).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Use this Redis instead of a private one (flushes nothing).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Runs per worker at once.")] = 128,
    lease_ms: Annotated[int, typer.Option(help="Run lease time of the workers (ms).")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of the fault schedule.")] = 0,
    quick: Annotated[
        bool,
        typer.Option(
            help="A short smoke run (CI), faults included; it fails if a run is lost or "
            "another tenant's run can be read."
        ),
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """The daemon under load (runs/s, API latency) and under faults (lost runs, repeats)."""
    if restart_redis and redis_url is not None:
        raise typer.BadParameter("--restart-redis needs the private Redis (no --redis-url)")
    if quick:
        # a smoke run (CI) that still takes the fault path: a worker is killed twice and,
        # with the private Redis, Redis once, while the faults phase submits
        tenants, rate, duration = min(tenants, 5), min(rate, 40.0), min(duration, 4.0)
        kill_every = min(kill_every or duration, duration / 2 - 0.01)
        restart_redis = restart_redis or redis_url is None
    config = {
        "tenants": tenants, "workers": workers, "rate": rate, "duration_s": duration,
        "kill_every_s": kill_every, "restart_redis": restart_redis, "fault_rate": fault_rate,
        "concurrency": concurrency,
        "lease_ms": lease_ms, "nodes_per_run": NODES, "cpus": os.cpu_count(),
        "redis": redis_url or "private, appendonly yes, appendfsync always",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="treadle-bench-service-") as tmp:
        results = anyio.run(
            lambda: _bench(
                tenants=tenants, workers=workers, rate=rate, duration=duration,
                kill_every=kill_every, restart_redis=restart_redis, fault_rate=fault_rate,
                redis_url=redis_url,
                concurrency=concurrency, lease_ms=lease_ms, seed=seed, workdir=Path(tmp),
            )
        )  # fmt: skip
    columns = ["phase", "offered/s", "runs/s", "drain s", "api p50 ms", "api p99 ms",
               "lost", "dup nodes", "x-tenant ok", "kills", "redis restarts"]  # fmt: skip
    rows = [
        [name, r["offered_rate"], r["runs_per_s"], r["drain_s"], r["api_p50_ms"], r["api_p99_ms"],
         r["runs_lost"], r["duplicate_completions"], r["cross_tenant_reads_allowed"],
         r["worker_kills"], r["redis_restarts"]]
        for name, r in results.items()
    ]  # fmt: skip
    console = Console(width=max(120, Console().width))
    print_table("treadle bench service", columns, rows, console=console)
    parts = ["api", "workers", "redis", "load generator"]
    cpu_rows = [[name, *(r["cpu_ms_per_run"].get(p) for p in parts)] for name, r in results.items()]
    print_table("CPU ms per completed run", ["phase", *parts], cpu_rows, console=console)
    write_report(json_path, "service", config, results, {})
    broken = [
        f"{name}: {r['runs_lost']} runs lost, {r['cross_tenant_reads_allowed']} other "
        "tenants' runs read"
        for name, r in results.items()
        if r["runs_lost"] or r["cross_tenant_reads_allowed"]
    ]
    if quick and broken:  # the smoke run fails on what must never happen
        console.print("\n".join(broken), style="red", markup=False)
        raise typer.Exit(1)
