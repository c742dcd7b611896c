"""`treadle bench agents`: serving whole agent programs on a KV-bound cluster
(docs/benchmarks.md, "Agent programs").

Multi-turn agent programs (`workloads.py`: `swe`, `bfcl`, `multiagent`, `mixed`; or the
sessions of a GitHub Copilot agent trace, `--trace PATH`, `copilot.py`) arrive as a Poisson
process and run on a simulated cluster of engine replicas (`sim.py`; default 4 x H100 +
Llama-3.1-8B, `--profile` for others) in virtual time, under each system (`systems.py`):
`vllm` (the fair baseline: FCFS, prefix caching, session affinity), `vllm-least-load`,
`vllm-rr`, `continuum`, `autellix`, `treadle`, and `bound` (the same engines with
unlimited KV: the physical limit memory puts on FCFS serving). Every system runs the same
programs on the same seeds.

Metrics:

- **capacity** (`capacity.py`): the highest arrival rate at which the mean JCT stays within
  `--slo-factor` (2) x the programs' mean ideal JCT (each program alone on an empty replica
  with a perfect prefix cache), averaged over `--seeds` seeds at every rate of a geometric
  grid shared by all systems;
- at the **reference load** (the fair `vllm`'s capacity): JCT mean / p50 / p99 (programs
  of all seeds pooled), mean JCT / ideal, programs finished per minute, prefix hit rate,
  recomputed prompt tokens and preemptions per run;
- **goodput under overload**: programs finished per minute at 1.5 x the system's own
  capacity, and its ratio to the throughput at capacity (collapse shows here);
- on `mixed`, Jain's index over tenants' mean JCT / ideal at the reference load, and each
  tenant's share of the GPU token-time under overload against its weight's share.

Programs are measured after a warm-up (the first quarter of the arrival span), so that the
cluster is loaded when they arrive; throughput counts programs finished between the
warm-up's end and the last arrival.

`--micro` times the scheduler core alone: the cost of one decision with 10,000 calls queued.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from treadle.backends.sim import Profile
from treadle.benchmarks.agents.capacity import Grid, SystemSearch
from treadle.benchmarks.agents.copilot import generate_sessions, write_sessions
from treadle.benchmarks.agents.report import OVERLOAD_FACTOR, build_report, print_report
from treadle.benchmarks.agents.sim import PointResult, Simulation
from treadle.benchmarks.agents.spec import (
    BenchOutcome,
    BenchSpec,
    ClusterSpec,
    Source,
    cached_ideal,
)
from treadle.benchmarks.agents.systems import SYSTEMS, make_system
from treadle.benchmarks.agents.workloads import WORKLOADS
from treadle.benchmarks.common import print_table, write_report
from treadle.runtime.sched.limits import LimitConfig
from treadle.runtime.sched.scheduler import Call, Scheduler, SchedulerConfig

DEFAULT_PROFILE = "h100_sxm_llama31_8b"
#: programs per point: programs keep arriving for many times their JCT, so that a rate
#: the system cannot sustain shows as a growing backlog, not a short burst
DEFAULT_PROGRAMS = {"swe": 300, "bfcl": 1000, "multiagent": 1000, "mixed": 800, "trace": 200}
#: `--quick`: a smaller cluster and one seed, so the runs stay long (in minutes of arrivals)
#: for their few programs; it shows the direction, the default run measures it
QUICK_PROGRAMS = {"swe": 120, "bfcl": 400, "multiagent": 400, "mixed": 300, "trace": 60}
QUICK = {"replicas": 2, "seeds": 1, "grid_step": 1.3}
DEFAULTS = {"replicas": 4, "seeds": 3, "grid_step": 1.25}
#: the grid starts at this many times the rate at which each replica would run one
#: program at a time at its ideal speed
GRID_START = 4.0
REFERENCE = "vllm"

# -- points ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointJob:
    source: Source
    seed: int
    system: str
    rate_per_min: float
    cluster: ClusterSpec
    #: what the point is for: "grid" (capacity search), "ref" (reference load), "over"
    phase: str = "grid"


def run_point(job: PointJob) -> PointResult:
    """One system at one rate on one seed's programs (in a worker process: workloads are
    regenerated there from their seed, the same data everywhere)."""
    cluster = job.cluster
    sim = Simulation(
        job.source.load(job.seed),
        make_system(job.system),
        rate_per_s=job.rate_per_min / 60.0,
        replicas=cluster.replicas,
        profile=Profile.load(cluster.profile),
        kv_capacity_tokens=cluster.kv_tokens,
    )
    result = sim.run(cached_ideal(job.source, job.seed, cluster.profile), job.seed)
    result.rate_per_min = job.rate_per_min  # exactly the grid's rate (not x / 60 * 60)
    return result


class PoolRunner:
    """Runs points on a process pool (or in this process for `workers=1`), yielding each
    result as it comes; `submit` may be called while results are being consumed."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
        self._futures: dict[Future[PointResult], PointJob] = {}
        self._local: list[PointJob] = []

    def submit(self, job: PointJob) -> None:
        if self._pool is None:
            self._local.append(job)
        else:
            self._futures[self._pool.submit(run_point, job)] = job

    @property
    def pending(self) -> int:
        return len(self._futures) + len(self._local)

    def next_done(self) -> list[tuple[PointJob, PointResult]]:
        if self._pool is None:
            job = self._local.pop(0)
            return [(job, run_point(job))]
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        return [(self._futures.pop(f), f.result()) for f in done]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


# -- the whole run --------------------------------------------------------------------------


def grid_for(spec: BenchSpec) -> tuple[Grid, float]:
    """The rate grid and the workload's mean ideal JCT (seed `spec.seeds[0]`)."""
    ideal = cached_ideal(spec.source, spec.seeds[0], spec.cluster.profile)
    mean_ideal = statistics.fmean(ideal.values())
    start = spec.grid_start or GRID_START * spec.cluster.replicas * 60.0 / mean_ideal
    return Grid(start, spec.grid_step), mean_ideal


def run_bench(spec: BenchSpec, *, progress: Progress | None = None) -> BenchOutcome:
    """Every system's capacity search, then every system at the reference load and at 1.5 x
    its own capacity; all points of all systems share one process pool."""
    started = time.perf_counter()
    grid, mean_ideal = grid_for(spec)
    searches = {s: SystemSearch(s, grid, spec.seeds, spec.slo_factor) for s in spec.systems}
    outcome = BenchOutcome(spec, grid, searches, math.nan, ideal_mean_s=mean_ideal)
    runner = PoolRunner(spec.workers)
    task = progress.add_task("capacity", total=0) if progress is not None else None
    queued: set[tuple[str, float, int]] = set()
    extra: dict[str, dict[str, list[PointResult]]] = {"ref": {}, "over": {}}
    planned: set[tuple[str, str]] = set()

    def job(system: str, rate: float, seed: int, phase: str = "grid") -> PointJob:
        return PointJob(spec.source, seed, system, rate, spec.cluster, phase)

    def feed() -> None:
        for name, search in searches.items():
            for rate, seed in search.wanted():
                if (name, rate, seed) not in queued:
                    queued.add((name, rate, seed))
                    runner.submit(job(name, rate, seed))
                    _grow(progress, task, 1)
        ref_search = searches.get(REFERENCE) or next(iter(searches.values()))
        if ref_search.done and math.isnan(outcome.reference_per_min):
            outcome.reference_per_min = ref_search.capacity()
        for name, search in searches.items():
            for phase, rate in (
                ("ref", outcome.reference_per_min),
                ("over", OVERLOAD_FACTOR * search.capacity() if search.done else math.nan),
            ):
                if math.isnan(rate) or (phase, name) in planned:
                    continue
                planned.add((phase, name))
                extra[phase][name] = []
                for seed in spec.seeds:
                    runner.submit(job(name, rate, seed, phase))
                    _grow(progress, task, 1)

    try:
        feed()
        while runner.pending:
            for done_job, result in runner.next_done():
                if done_job.phase == "grid":
                    searches[done_job.system].add(result)
                else:
                    extra[done_job.phase][done_job.system].append(result)
                if progress is not None and task is not None:
                    progress.update(
                        task,
                        advance=1,
                        description=_describe(searches, outcome.reference_per_min),
                    )
            feed()
    finally:
        runner.close()
    stalled = [name for name, search in searches.items() if not search.done]
    if stalled:
        raise RuntimeError(f"capacity search stalled for {stalled}")
    outcome.at_ref = extra["ref"]
    outcome.overload = extra["over"]
    outcome.wall_s = time.perf_counter() - started
    return outcome


def _grow(progress: Progress | None, task: Any, n: int) -> None:
    if progress is not None and task is not None:
        total = progress.tasks[task].total or 0
        progress.update(task, total=total + n)


def _describe(searches: dict[str, SystemSearch], ref: float) -> str:
    busy = [f"{n} {s.current_rate:.1f}/min" for n, s in searches.items() if not s.done]
    if busy:
        return "capacity: " + ", ".join(busy[:3]) + (" ..." if len(busy) > 3 else "")
    return f"reference load {ref:.2f}/min and overload"


# -- the micro-benchmark ------------------------------------------------------------------------


def micro_benchmark(
    queued: int = 10_000, decisions: int = 20_000, seed: int = 0
) -> dict[str, float]:
    """Cost of one scheduling decision with `queued` calls waiting: each round completes one
    call, submits one (so the queue stays at `queued`) and dispatches one."""
    rng = random.Random(seed)
    sched = Scheduler(
        4,
        SchedulerConfig(
            limits=LimitConfig(initial=8, minimum=8, maximum=8), backlog_factor=math.inf
        ),
    )
    tenants = [f"t{i}" for i in range(16)]
    for i, t in enumerate(tenants):
        sched.set_weight(t, 1.0 + i % 4)
    n_programs = max(1, queued // 10)
    counter = 0

    def submit_new(now: float) -> None:
        nonlocal counter
        counter += 1
        program = rng.randrange(n_programs)
        call = Call(
            f"c{counter}",
            f"p{program}",
            est_service_s=rng.uniform(0.05, 2.0),
            remaining_cost_s=rng.uniform(0.0, 30.0),
        )
        sched.submit(call, now, tenant=tenants[program % len(tenants)])

    now = 0.0
    for _ in range(queued):
        submit_new(now)
    in_flight = list(sched.dispatch(now))
    started = time.perf_counter()
    for _ in range(decisions):
        now += 0.001
        done = in_flight.pop(rng.randrange(len(in_flight)))
        sched.complete(done, now, service_s=done.est_service_s * rng.uniform(0.5, 1.5))
        submit_new(now)
        nxt = sched.next_for(done.assigned or 0, now)
        if nxt is not None:
            in_flight.append(nxt)
        else:
            in_flight.extend(sched.dispatch(now))
    elapsed = time.perf_counter() - started
    return {
        "queued_calls": float(sched.queued_calls),
        "decisions": float(decisions),
        "us_per_decision": elapsed / decisions * 1e6,
    }


def micro_admission(
    waiting: int = 10_000, decisions: int = 20_000, seed: int = 0, *, counting: bool = False
) -> dict[str, float]:
    """Cost of one admission decision with `waiting` programs queued for KV: each round a
    resident program ends, the next one is admitted by KV residency, and a new one joins
    the queue (so it stays at `waiting`), over 16 tenants with weights."""
    rng = random.Random(seed)
    sched = Scheduler(4, SchedulerConfig(), kv_budgets=[400_000] * 4, count_comparisons=counting)
    tenants = [f"t{i}" for i in range(16)]
    for i, t in enumerate(tenants):
        sched.set_weight(t, 1.0 + i % 4)
    n = 0

    def arrive(now: float) -> None:
        nonlocal n
        n += 1
        sched.open_program(
            f"p{n}", tenants[n % len(tenants)], now, kv_tokens=rng.randrange(5_000, 40_000)
        )

    now = 0.0
    while sched.pending_programs < waiting:
        arrive(now)
    before = sched.comparisons
    elapsed = 0.0
    for _ in range(decisions):
        now += 0.001
        lane = sched.lanes[rng.randrange(len(sched.lanes))]
        done = rng.choice(list(lane.residents)) if lane.residents else None
        started = time.perf_counter()  # the scheduler's work only, not picking a victim
        if done is not None:
            sched.close_program(done, now)
        arrive(now)
        elapsed += time.perf_counter() - started
    return {
        "waiting_programs": float(sched.pending_programs),
        "decisions": float(decisions),
        "us_per_admission": elapsed / decisions * 1e6,
        "comparisons_per_admission": (sched.comparisons - before) / decisions,
    }


# -- the command -----------------------------------------------------------------------------


def _parse_systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        raise typer.BadParameter(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    return names


def main(
    workload: Annotated[
        str, typer.Option("--workload", help=f"One of: {', '.join(WORKLOADS)}.")
    ] = "swe",
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="Replay the sessions of a Copilot agent trace (JSONL)."),
    ] = None,
    generate_trace: Annotated[
        Path | None,
        typer.Option(
            "--generate-trace",
            help="Write --sessions generated sessions in the Copilot trace format and exit.",
        ),
    ] = None,
    sessions: Annotated[
        int, typer.Option("--sessions", min=1, help="Sessions for --generate-trace.")
    ] = 500,
    replicas: Annotated[
        int | None, typer.Option("--replicas", min=1, help="Engine replicas (4; --quick: 2).")
    ] = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", min=1, help="Seeds per rate (3; --quick: 1).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The first seed.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="2 replicas, 1 seed, fewer programs (< 60 s).")
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    programs: Annotated[
        int | None, typer.Option("--programs", min=4, help="Programs per point.")
    ] = None,
    profile: Annotated[
        str, typer.Option("--profile", help="Simulator profile (name or JSON path).")
    ] = DEFAULT_PROFILE,
    kv_tokens: Annotated[
        int | None,
        typer.Option(
            "--kv-tokens",
            min=1024,
            help="KV cache capacity per replica in tokens (default: the profile's).",
        ),
    ] = None,
    systems: Annotated[
        str, typer.Option("--systems", help=f"Comma list of: {', '.join(SYSTEMS)}.")
    ] = ",".join(SYSTEMS),
    slo_factor: Annotated[
        float, typer.Option("--slo-factor", min=1.0, help="Capacity SLO: mean JCT <= this x ideal.")
    ] = 2.0,
    grid_step: Annotated[
        float | None,
        typer.Option("--grid-step", min=1.01, help="Ratio between grid rates (1.25; quick 1.3)."),
    ] = None,
    grid_start: Annotated[
        float | None, typer.Option("--grid-start", help="First grid rate (programs/min).")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes (default: the CPU count).")
    ] = os.cpu_count() or 1,
    micro: Annotated[
        bool, typer.Option("--micro", help="Only time the scheduler core at 10,000 queued calls.")
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", help="sim, or llamacpp: a real llama-server (realengine).")
    ] = "sim",
) -> None:
    """Whole agent programs on a simulated KV-bound cluster: capacity, JCT at the reference
    load and goodput under overload of treadle against vLLM, Continuum and Autellix."""
    console = Console(width=max(Console().width, 150))
    if engine != "sim":
        from treadle.benchmarks.agents.realengine import run_cli

        run_cli(engine, quick=quick, json_path=json_path, seed=seed, profile=profile)
        return
    if micro:
        m = micro_benchmark()
        a = micro_admission()
        print_table(
            "scheduler core: one call decision (complete + submit + dispatch), one admission "
            "(a program ends, the next is admitted by KV, one arrives)",
            ["queued calls", "us per decision", "waiting programs", "us per admission"],
            [
                [
                    int(m["queued_calls"]),
                    m["us_per_decision"],
                    int(a["waiting_programs"]),
                    a["us_per_admission"],
                ]
            ],
            console=console,
        )
        if json_path is not None:
            write_report(
                json_path, "agents-micro", {"queued": 10_000}, {"scheduler": m, "admission": a}, {}
            )
        return
    if generate_trace is not None:
        n = write_sessions(generate_trace, generate_sessions(sessions, seed))
        typer.echo(f"wrote {n} sessions to {generate_trace}")
        return
    if trace is None and workload not in WORKLOADS:
        raise typer.BadParameter(
            f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}"
        )
    name = "trace" if trace is not None else workload
    table = QUICK_PROGRAMS if quick else DEFAULT_PROGRAMS
    base = QUICK if quick else DEFAULTS
    n_seeds = seeds or int(base["seeds"])
    spec = BenchSpec(
        source=Source(name, programs or table[name], str(trace) if trace else None),
        cluster=ClusterSpec(replicas or int(base["replicas"]), profile, kv_tokens),
        systems=_parse_systems(systems),
        seeds=tuple(range(seed, seed + n_seeds)),
        slo_factor=slo_factor,
        grid_step=grid_step or base["grid_step"],
        grid_start=grid_start,
        workers=workers,
    )
    try:
        spec.source.load(spec.seeds[0])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        outcome = run_bench(spec, progress=progress)
    report = build_report(outcome)
    print_report(report, console=console)
    write_report(json_path, "agents", report["config"], report["results"], report["ratios"])
    if json_path is not None:
        typer.echo(f"wrote {json_path}")


if __name__ == "__main__":
    typer.run(main)
