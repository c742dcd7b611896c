"""`treadle bench service`: the daemon under load, faults and a hostile tenant
(docs/benchmarks.md).

K tenants submit runs of a small 5-node workflow (four LLM nodes on the scripted backend,
one tool node with a side effect) through the HTTP API, at a fixed rate (open loop: a
request is sent on schedule whether or not earlier ones have been answered), to W worker
processes on a real Redis. Everything runs as separate processes on this machine: a
private `redis-server` (append-only file, `appendfsync always`) unless `--redis-url` is
given, the API (`treadle serve --no-worker`), the workers (`treadle worker`), and this
process as the load generator (`service_load`).

Phases (each followed by a drain):
- `full`: `--rate` runs/s for `--duration` s;
- `half`: half that rate (the API latency target is for this phase);
- `adversary` (with `--adversary`): half the rate from the normal tenants while one more
  tenant attacks (`service_adversary`): bursts past its quotas, holds every event stream
  it may, runs a catastrophic regex, half-sends connections, reads outside its root;
- `faults` (with `--kill-every` and/or `--restart-redis`; always with `--quick`):
  `--fault-rate` runs/s (default half the rate) while a worker is SIGKILLed (and restarted
  at once) every `--kill-every` s, and Redis is SIGKILLed and restarted once, half-way (its
  append-only file is fsynced on every write, so nothing it acknowledged is lost).

A drain waits until every accepted run is terminal, or until the work queue is empty (no
run is waiting for, or held by, a worker), or `--drain-timeout`.

Metrics per phase:
- `runs_per_s`: runs that succeeded, over the time from the phase's first submission to
  its last completion (the offered rate when the system keeps up, its capacity when not);
- `drain_s`: how long after the last submission the last run finished (a backlog);
- `api_p50_ms` / `api_p99_ms`: client-side latency of every API request of the phase's
  normal tenants, a submission's counted from when it was due (so queueing in front of a
  slow API counts);
- `runs_lost`: accepted runs (201) not terminal once the queue has drained: nothing will
  ever finish them. `runs_unfinished` counts those still queued when the drain timed out
  (a backlog, not a loss), with `queue_left` entries;
- `reexecuted_nodes`: node executions started again after a worker died (the same node
  instance and attempt started more than once in a journal): at-least-once, as designed;
- `duplicate_completions`: a node instance that *finished* more than once in one run's
  journal (must be 0: fencing keeps a stale worker from recording);
- `tool_calls`, `tool_reexecutions`, `idempotency_keys_per_call`: from the side-effect
  tool's own record (`service_sink`): every call of the same node execution (same inputs)
  must carry one idempotency key, so the service behind it can drop the repeats;
- `cross_tenant_reads_allowed`: reads of other tenants' runs (every 10th submit also
  tries one; GET run and GET events) that were not refused with 404 (must be 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from redis.exceptions import RedisError
from rich.console import Console

from treadle.benchmarks.common import percentile, print_table, write_report
from treadle.benchmarks.service_load import Load, Phase
from treadle.benchmarks.service_sink import SINK_ENV
from treadle.runtime.core.events import NodeFinished, NodeStarted, RunStarted
from treadle.runtime.core.store import TERMINAL
from treadle.runtime.stores import codec
from treadle.testing.processes import (
    DaemonProcess,
    RedisServer,
    RedisUnavailable,
    free_port,
    wait_port,
)

SINK_MODULE = "treadle.benchmarks.service_sink"
WORKFLOW = f"""\
name: five
description: Outline, expand twice, merge (a tool with a side effect), title.
inputs:
  topic: str
models:
  default: {{backend: scripted}}
nodes:
  - {{id: outline, kind: llm, prompt: "Outline {{topic}}", inputs: {{topic: $input.topic}}}}
  - {{id: part1, kind: llm, prompt: "Expand part one of {{o}}", inputs: {{o: $outline}}}}
  - {{id: part2, kind: llm, prompt: "Expand part two of {{o}}", inputs: {{o: $outline}}}}
  - {{id: merge, kind: tool, tool: "{SINK_MODULE}:merge", inputs: {{a: $part1, b: $part2}}}}
  - {{id: title, kind: llm, prompt: "Title for {{m}}", inputs: {{m: $merge}}}}
outputs:
  title: $title
"""
NODES = 5
PREFIX = "treadle"
#: the adversary's active-run quota (the normal tenants' is unlimited)
ADVERSARY_QUOTA = 20


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


def _children(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class _CpuMeter:
    """CPU used by each part of the system during a phase, its processes' children included
    (the API's definition checker). A part whose processes were restarted meanwhile (fault
    injection) reports None: its dead processes' time is gone."""

    def __init__(self, parts: dict[str, list[Any]]) -> None:
        self.parts = parts
        self.start = self._sample()

    @staticmethod
    def _pid(proc: Any) -> int | None:
        if proc == "self":
            return os.getpid()
        popen = getattr(proc, "proc", None)
        return popen.pid if popen is not None else None

    def _sample(self) -> dict[str, tuple[tuple[int | None, ...], dict[int, float]]]:
        out = {}
        for name, procs in self.parts.items():
            roots = tuple(self._pid(p) for p in procs)
            pids = [pid for root in roots if root is not None for pid in (root, *_children(root))]
            if any(proc == "self" for proc in procs):
                pids = [os.getpid()]  # the load generator's children are the adversary's
            out[name] = (roots, {pid: _cpu_s(pid) for pid in pids})
        return out

    def used(self) -> dict[str, float | None]:
        end = self._sample()
        used: dict[str, float | None] = {}
        for name, (roots, cpu) in end.items():
            start_roots, start_cpu = self.start[name]
            if roots != start_roots:
                used[name] = None
            else:
                used[name] = sum(c - start_cpu.get(pid, 0.0) for pid, c in cpu.items())
        return used


# -- faults ----------------------------------------------------------------------------


async def _inject_faults(
    phase: Phase,
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


async def _adversary(
    url: str, key: str, duration_s: float, paths: list[str], report: dict[str, Any]
) -> None:
    """The adversary, in a process of its own (`service_adversary`); its report into
    `report`."""
    done = await anyio.run_process(
        [sys.executable, "-m", "treadle.benchmarks.service_adversary", url, str(duration_s),
         *paths],
        env={**os.environ, "TREADLE_API_KEY": key},
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the adversary failed:\n{done.stderr.decode(errors='replace')}")
    report.update(json.loads(done.stdout))


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


async def _drain(client: Any, phase: Phase, timeout_s: float) -> tuple[dict[str, Any], int]:
    """Wait until every accepted run is terminal, or the work queue is empty, or the
    timeout; (the runs' records, queue entries left: 0 once it has drained)."""
    deadline = time.monotonic() + timeout_s
    ids = list(phase.accepted)
    while True:
        try:
            records = await _records(client, ids)
            if all(r is not None and r.status in TERMINAL for r in records.values()):
                return records, 0
            left = int(await client.xlen(f"{PREFIX}:queue"))
            if left == 0:
                # a run's record turns terminal before its entry goes: read them once more
                return await _records(client, ids), 0
        except (RedisError, OSError):
            await anyio.sleep(0.5)
            continue
        if time.monotonic() > deadline:
            return records, left
        await anyio.sleep(0.25)


async def _journal_stats(client: Any, run_ids: list[str]) -> dict[str, int]:
    """Over the runs' journals: node executions started again, nodes that finished more than
    once, runs resumed."""
    stats = Counter[str]()
    for i in range(0, len(run_ids), 200):
        chunk = run_ids[i : i + 200]
        async with client.pipeline(transaction=False) as pipe:
            for run_id in chunk:
                pipe.xrange(f"{PREFIX}:{{{run_id}}}:events", "-", "+")
            streams = await pipe.execute()
        for entries in streams:
            events = [codec.decode_event(fields[b"e"]) for _id, fields in entries]
            started = Counter((e.node, e.attempt) for e in events if isinstance(e, NodeStarted))
            finished = Counter(e.node for e in events if isinstance(e, NodeFinished))
            stats["reexecuted_nodes"] += sum(c - 1 for c in started.values())
            stats["duplicate_completions"] += sum(c - 1 for c in finished.values())
            stats["resumed_runs"] += any(isinstance(e, RunStarted) and e.resumed for e in events)
    return dict(stats)


def _sink_stats(sink: Path, run_ids: set[str]) -> dict[str, int]:
    """The side-effect tool's calls for these runs: each line is `key<TAB>inputs digest`.
    Every call with the same inputs is the same node execution (a run's inputs are its
    own), so one key per inputs digest is what a service needs to drop repeats."""
    keys_by_call: defaultdict[str, set[str]] = defaultdict(set)
    calls = 0
    without_key = 0
    with contextlib.suppress(FileNotFoundError), sink.open() as lines:
        for line in lines:
            key, _, digest = line.rstrip("\n").partition("\t")
            if key.split(":", 1)[0] not in run_ids:
                continue
            calls += 1
            without_key += key == "-"
            keys_by_call[digest].add(key)
    distinct = sum(len(keys) for keys in keys_by_call.values())
    return {
        "tool_calls": calls,
        "tool_reexecutions": calls - distinct,
        "idempotency_keys_per_call": max((len(k) for k in keys_by_call.values()), default=0),
        "tool_calls_without_key": without_key,
    }


def _summarize(
    phase: Phase, records: dict[str, Any], queue_left: int, journal: dict[str, int]
) -> dict[str, Any]:
    finished = {rid: r for rid, r in records.items() if r is not None and r.status in TERMINAL}
    succeeded = [r for r in finished.values() if r.status == "succeeded"]
    last = max((r.updated_at for r in finished.values()), default=phase.ended)
    # all the phase's runs over the time they took: the offered rate when the system keeps
    # up, its capacity when a backlog builds (drain_s then says how far behind it fell)
    elapsed = max(phase.duration_s, last - phase.started)
    unfinished = len(records) - len(finished)
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
        "runs_lost": unfinished if queue_left == 0 else 0,
        "runs_unfinished": unfinished if queue_left else 0,
        "queue_left": queue_left,
        "reexecuted_nodes": journal.get("reexecuted_nodes", 0),
        "duplicate_completions": journal.get("duplicate_completions", 0),
        "resumed_runs": journal.get("resumed_runs", 0),
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
    adversary: bool,
    redis_url: str | None,
    concurrency: int,
    lease_ms: int,
    worker_nice: int,
    drain_timeout: float,
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
    files = workdir / "files"  # each tenant's read_file root: files/<tenant>
    sink = workdir / "sink.txt"
    os.environ[SINK_ENV] = str(sink)  # the workers (children) inherit it
    common = ["--redis", redis_url, "--allow-imports", SINK_MODULE, "--log-level", "warning"]
    port = free_port()
    api = DaemonProcess(
        ["serve", "--no-worker", "--port", str(port), "--files-root", str(files), *common],
        workdir / "api.log",
    )
    worker_args = ["worker", "--concurrency", str(concurrency), "--lease-ms", str(lease_ms),
                   "--files-root", str(files), "--nice", str(worker_nice), *common]  # fmt: skip
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
            (files / name).mkdir(parents=True)
            (files / name / "secret.txt").write_text(f"{name}'s secret")
        mallory = f"mallory-{stamp}"
        if adversary:
            await store.create(mallory, max_concurrent_runs=ADVERSARY_QUOTA)
            (files / mallory).mkdir(parents=True)
        api.start()
        assert api.proc is not None
        await anyio.to_thread.run_sync(wait_port, port, "the API", api.proc)
        for child in pool:
            child.start()
        url = f"http://127.0.0.1:{port}"
        load = Load(url, keys, seed)
        for tenant in keys:
            await load.register(tenant, WORKFLOW)
        await anyio.sleep(1.5)  # the workers import and connect
        phases = [Phase("full", rate, duration), Phase("half", rate / 2, duration)]
        if adversary:
            phases.append(Phase("adversary", rate / 2, duration))
        if kill_every is not None or restart_redis:
            phases.append(Phase("faults", fault_rate or rate / 2, duration))
        results: dict[str, dict[str, Any]] = {}
        rng = random.Random(seed)
        for phase in phases:
            meter = _CpuMeter(
                {"api": [api], "workers": pool, "redis": [redis] if redis else [],
                 "load generator": ["self"]}
            )  # fmt: skip
            attack: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:
                if phase.name == "faults":
                    tg.start_soon(
                        _inject_faults, phase, pool, redis, kill_every, restart_redis, rng
                    )
                if phase.name == "adversary":
                    victim = next(iter(keys))
                    paths = ["pyproject.toml", ".git/config", f"../{victim}/secret.txt",
                             str(files / victim / "secret.txt"), "/etc/passwd"]  # fmt: skip
                    token = (await store.issue_key(mallory)).token
                    tg.start_soon(_adversary, url, token, phase.duration_s, paths, attack)
                await load.run_phase(phase)
            records, queue_left = await _drain(client, phase, drain_timeout)
            journal = await _journal_stats(client, list(phase.accepted))
            cpu = meter.used()
            summary = _summarize(phase, records, queue_left, journal)
            summary.update(_sink_stats(sink, set(phase.accepted)))
            summary["load_average_1m"] = os.getloadavg()[0]
            done = max(1, summary["succeeded"])
            summary["cpu_ms_per_run"] = {
                k: (v * 1000 / done if v is not None else None) for k, v in cpu.items()
            }
            if phase.name == "adversary":
                summary["victim_api_p50_ms"] = summary["api_p50_ms"]
                summary["victim_api_p99_ms"] = summary["api_p99_ms"]
                summary["victim_runs_lost"] = summary["runs_lost"]
                summary.update(attack)
            results[phase.name] = summary
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
    adversary: Annotated[
        bool, typer.Option(help="Add a phase where one hostile tenant attacks the others.")
    ] = False,
    redis_url: Annotated[
        str | None, typer.Option(help="Use this Redis instead of a private one (flushes nothing).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Runs per worker at once.")] = 128,
    lease_ms: Annotated[int, typer.Option(help="Run lease time of the workers (ms).")] = 3000,
    worker_nice: Annotated[
        int,
        typer.Option(min=0, max=19, help="Niceness of the workers: the API's answers come first."),
    ] = 5,
    drain_timeout: Annotated[
        float, typer.Option(help="Most seconds a phase's drain waits for the queue to empty.")
    ] = 300.0,
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
    """The daemon under load (runs/s, API latency), under faults (lost runs, re-executions)
    and under attack by one of its tenants (`--adversary`)."""
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
        "adversary": adversary, "concurrency": concurrency,
        "lease_ms": lease_ms, "worker_nice": worker_nice, "nodes_per_run": NODES,
        "cpus": os.cpu_count(),
        "redis": redis_url or "private, appendonly yes, appendfsync always",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="treadle-bench-service-") as tmp:
        results = anyio.run(
            lambda: _bench(
                tenants=tenants, workers=workers, rate=rate, duration=duration,
                kill_every=kill_every, restart_redis=restart_redis, fault_rate=fault_rate,
                adversary=adversary, redis_url=redis_url, concurrency=concurrency,
                lease_ms=lease_ms, worker_nice=worker_nice, drain_timeout=drain_timeout,
                seed=seed, workdir=Path(tmp),
            )
        )  # fmt: skip
    console = _print(results)
    write_report(json_path, "service", config, results, {})
    broken = [
        f"{name}: {r['runs_lost']} runs lost, {r['cross_tenant_reads_allowed']} other "
        f"tenants' runs read, {r.get('forbidden_reads_allowed', 0)} reads outside the root"
        for name, r in results.items()
        if r["runs_lost"] or r["cross_tenant_reads_allowed"] or r.get("forbidden_reads_allowed")
    ]
    if quick and broken:  # the smoke run fails on what must never happen
        console.print("\n".join(broken), style="red", markup=False)
        raise typer.Exit(1)


def _print(results: dict[str, dict[str, Any]]) -> Console:
    console = Console(width=max(140, Console().width))
    columns = ["phase", "offered/s", "runs/s", "drain s", "api p50 ms", "api p99 ms", "lost",
               "unfinished", "re-exec nodes", "dup done", "tool re-exec", "keys/call",
               "x-tenant ok", "kills", "redis restarts", "load 1m"]  # fmt: skip
    rows = [
        [name, r["offered_rate"], r["runs_per_s"], r["drain_s"], r["api_p50_ms"], r["api_p99_ms"],
         r["runs_lost"], r["runs_unfinished"], r["reexecuted_nodes"], r["duplicate_completions"],
         r["tool_reexecutions"], r["idempotency_keys_per_call"], r["cross_tenant_reads_allowed"],
         r["worker_kills"], r["redis_restarts"], r["load_average_1m"]]
        for name, r in results.items()
    ]  # fmt: skip
    print_table("treadle bench service", columns, rows, console=console)
    parts = ["api", "workers", "redis", "load generator"]
    cpu_rows = [[name, *(r["cpu_ms_per_run"].get(p) for p in parts)] for name, r in results.items()]
    print_table("CPU ms per completed run", ["phase", *parts], cpu_rows, console=console)
    attacked = results.get("adversary")
    if attacked is not None:
        refusals = ", ".join(f"{k}: {v}" for k, v in attacked["adversary_refusals"].items())
        rows = [
            ["victim api p50 / p99 ms",
             f"{attacked['victim_api_p50_ms']:.1f} / {attacked['victim_api_p99_ms']:.1f}"],
            ["victim runs lost", attacked["victim_runs_lost"]],
            ["forbidden reads allowed",
             f"{attacked['forbidden_reads_allowed']} of {attacked['forbidden_reads_tried']}"],
            ["regex runs finished",
             f"{attacked['regex_runs_finished']} of {attacked['regex_runs']}"],
            ["adversary refusals", refusals or "-"],
            ["adversary runs accepted", attacked["adversary_accepted_runs"]],
            ["event streams held", attacked["adversary_streams_held"]],
            ["half-sent connections (closed by the server)",
             f"{attacked['adversary_half_open_connections']} "
             f"({attacked['adversary_half_open_closed_by_server']})"],
        ]  # fmt: skip
        print_table("adversary phase", ["", "value"], rows, console=console)
    return console
