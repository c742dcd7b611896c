"""`treadle bench agents`: scheduling whole agent programs (docs/benchmarks.md).

Multi-turn agent programs (`agents_workloads.py`: `swe`, `bfcl`, `multiagent`, `mixed`)
arrive as a Poisson process and run on a simulated cluster of engine replicas
(`agents_sim.py`, default 4 x H100 + Llama-3.1-8B) in virtual time, under four systems
(`agents_systems.py`: `vllm`, `continuum`, `autellix`, `treadle`), all in the same process
on the same programs and seeds.

The load is relative to the `vllm` system's **saturation throughput**, found by
measurement on a longer run (`SATURATION_PROGRAMS`): the arrival rate is raised (x1.5)
until vllm stops keeping up (it finishes less than 95 % of the work that arrives in the
measurement window, or a backlog builds: the later half of the programs is slowed 1.5x more
than the earlier half), then bisected on a log scale; the saturation throughput is the
highest rate it kept up with. Each load point runs every system at `load x saturation`.

Metrics per system and load: JCT mean / p50 / p95 / p99, programs per minute (finished
while programs arrive, after a warm-up quarter), prefix hit rate, recomputed prompt tokens
(uncached tokens that the program or a shared prompt had computed before, plus the engine's
recomputation after preemption), SLO attainment (JCT <= `--slo-factor` x ideal), Jain's
fairness index over tenants' mean normalised JCT (JCT / ideal), and JCT over each program's
ideal (its own LLM and tool time alone on an empty replica with a perfect cache).

`--micro` times the scheduler core alone: the cost of one decision with 10,000 calls queued.
"""

from __future__ import annotations

import functools
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from treadle.backends.sim import Profile
from treadle.benchmarks.agents.sim import SimResult, Simulation, ideal_times
from treadle.benchmarks.agents.systems import SYSTEMS, make_system
from treadle.benchmarks.agents.workloads import WORKLOADS, Workload, make_workload
from treadle.benchmarks.common import print_table, write_report
from treadle.runtime.sched.limits import LimitConfig
from treadle.runtime.sched.scheduler import Call, Scheduler, SchedulerConfig

DEFAULT_LOADS = (0.5, 0.7, 0.9, 1.0, 1.2)
DEFAULT_LOAD_TEXT = "0.5,0.7,0.9,1,1.2"
DEFAULT_PROFILE = "h100_sxm_llama31_8b"
#: programs per point: enough that programs arrive over a span many times their JCT
DEFAULT_PROGRAMS = {"swe": 240, "bfcl": 800, "multiagent": 800, "mixed": 1200}
#: programs per saturation probe: a longer horizon, so a slowly growing backlog shows
SATURATION_PROGRAMS = {"swe": 480, "bfcl": 1600, "multiagent": 1600, "mixed": 1200}
QUICK_PROGRAMS = 40

# -- running points ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    """The simulated cluster every system runs on."""

    replicas: int
    profile: str
    #: KV capacity per replica in tokens (None: the profile's)
    kv_tokens: int | None = None


def run_point(workload: Workload, system: str, rate: float, cluster: ClusterSpec) -> SimResult:
    sim = Simulation(
        workload,
        make_system(system),
        rate_per_s=rate,
        replicas=cluster.replicas,
        profile=Profile.load(cluster.profile),
        kv_capacity_tokens=cluster.kv_tokens,
    )
    return sim.run()


PointJob = tuple[str, int, int, str, float, ClusterSpec]


def _point_job(job: PointJob) -> SimResult:
    """A point in a worker process (workloads are regenerated there: same seed, same data)."""
    name, n, seed, system, rate, cluster = job
    return run_point(_cached_workload(name, n, seed), system, rate, cluster)


@functools.cache
def _cached_workload(name: str, n: int, seed: int) -> Workload:
    return make_workload(name, n, seed)


def run_points(jobs: Sequence[PointJob], workers: int) -> list[SimResult]:
    if workers <= 1 or len(jobs) <= 1:
        return [_point_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_point_job, jobs))


# -- saturation ---------------------------------------------------------------------------


def keeps_up(result: SimResult, ideal: dict[int, float]) -> bool:
    """Whether a run kept up with its arrivals: it finished at least 95 % of the work that
    arrived in the measurement window (programs weighted by their ideal JCT), and no
    backlog built up: the programs of the second half of the arrivals were slowed (JCT /
    ideal, on average) at most 1.5x as much as those of the first half."""
    times = sorted(result.arrivals.items(), key=lambda kv: kv[1])
    half = len(times) // 2
    early = statistics.fmean(result.jct[p] / ideal[p] for p, _ in times[:half])
    late = statistics.fmean(result.jct[p] / ideal[p] for p, _ in times[half:])
    return result.work_ratio(ideal) >= 0.95 and late <= 1.5 * early


def find_saturation(
    workload: Workload,
    ideal: dict[int, float],
    cluster: ClusterSpec,
    *,
    steps: int = 5,
    log: Any = None,
) -> tuple[float, list[dict[str, float]]]:
    """The highest arrival rate (programs/s) that `vllm` keeps up with (module docstring)."""
    trace: list[dict[str, float]] = []

    def probe(rate: float) -> bool:
        res = run_point(workload, "vllm", rate, cluster)
        ok = keeps_up(res, ideal)
        trace.append(
            {
                "rate_per_min": rate * 60,
                "throughput_per_min": res.throughput_per_min(),
                "work_ratio": res.work_ratio(ideal),
                "keeps_up": float(ok),
            }
        )
        if log:
            log(
                f"  saturation probe {rate * 60:7.2f}/min -> {'keeps up' if ok else 'falls behind'}"
            )
        return ok

    # a first guess from the work: each replica serves one program's ideal LLM time at once
    mean_ideal = statistics.fmean(ideal.values())
    rate = cluster.replicas / mean_ideal
    lo: float | None = None
    hi: float | None = None
    for _ in range(12):
        if probe(rate):
            lo = rate
            if hi is not None:
                break
            rate *= 1.5
        else:
            hi = rate
            if lo is not None:
                break
            rate /= 1.5
    if lo is None or hi is None:
        raise RuntimeError("could not bracket vllm's saturation rate")
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, trace


# -- the report -----------------------------------------------------------------------------


def _fmt_load(load: float) -> str:
    return f"{load:g}"


def ratios_at(results: dict[str, dict[str, dict[str, float]]], load: str) -> dict[str, float]:
    out: dict[str, float] = {}
    t = results.get("treadle", {}).get(load)
    v = results.get("vllm", {}).get(load)
    c = results.get("continuum", {}).get(load)
    if t and v:
        out["jct_mean_vs_vllm"] = v["jct_mean_s"] / t["jct_mean_s"]
        out["jct_p99_vs_vllm"] = v["jct_p99_s"] / t["jct_p99_s"]
        out["throughput_vs_vllm"] = t["throughput_per_min"] / v["throughput_per_min"]
    if t and c:
        out["jct_mean_vs_continuum"] = c["jct_mean_s"] / t["jct_mean_s"]
        out["jct_p99_vs_continuum"] = c["jct_p99_s"] / t["jct_p99_s"]
    return out


def run_bench(
    *,
    workload_name: str,
    loads: Sequence[float],
    cluster: ClusterSpec,
    seed: int,
    programs: int,
    systems: Sequence[str],
    saturation_programs: int,
    slo_factor: float,
    workers: int,
    saturation_per_min: float | None = None,
    log: Any = print,
) -> dict[str, Any]:
    profile = Profile.load(cluster.profile)
    workload = _cached_workload(workload_name, programs, seed)
    ideal = ideal_times(workload, profile)
    started = time.perf_counter()
    if saturation_per_min is None:
        sat_workload = _cached_workload(workload_name, saturation_programs, seed)
        sat_ideal = ideal_times(sat_workload, profile) if sat_workload is not workload else ideal
        log(f"finding vllm's saturation on {saturation_programs} programs ...")
        sat_rate, sat_trace = find_saturation(sat_workload, sat_ideal, cluster, log=log)
    else:
        sat_rate, sat_trace = saturation_per_min / 60.0, []
    log(
        f"vllm saturation: {sat_rate * 60:.2f} programs/min ({time.perf_counter() - started:.1f} s)"
    )
    points = [(load, system) for load in loads for system in systems]
    jobs: list[PointJob] = [
        (workload_name, programs, seed, system, load * sat_rate, cluster) for load, system in points
    ]
    outcomes = run_points(jobs, workers)
    results: dict[str, dict[str, dict[str, float]]] = {s: {} for s in systems}
    extras: dict[str, dict[str, Any]] = {s: {} for s in systems}
    for (load_value, system), res in zip(points, outcomes, strict=True):
        load = _fmt_load(load_value)
        results[system][load] = res.metrics(ideal, slo_factor)
        extras[system][load] = {
            "tenants_jct_over_ideal": res.tenant_means(ideal),
            "pins": res.pins,
            **res.frontend,
        }
    ratios = {_fmt_load(load): ratios_at(results, _fmt_load(load)) for load in loads}
    config = {
        "workload": workload_name,
        "workload_params": workload.params,
        "tools": {
            t.name: {"declared_s": t.declared_s, "true": t.describe}
            for t in workload.tools.values()
        },
        "programs": programs,
        "seed": seed,
        "replicas": cluster.replicas,
        "profile": cluster.profile,
        "kv_tokens_per_replica": cluster.kv_tokens or profile.kv_capacity_tokens,
        "loads": list(loads),
        "systems": list(systems),
        "saturation_per_min": sat_rate * 60,
        "saturation_programs": saturation_programs,
        "saturation_search": sat_trace,
        "ideal_jct_mean_s": statistics.fmean(ideal.values()),
        "slo_factor": slo_factor,
        "wall_s": time.perf_counter() - started,
        # per system and load: tenants' mean JCT / ideal, engine pin counters, the
        # frontend's own counters (pins asked, steals, final lane limits)
        "details": extras,
    }
    return {"config": config, "results": results, "ratios": ratios}


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    results = report["results"]
    cols = [
        "system",
        "load",
        "JCT mean s",
        "p50",
        "p95",
        "p99",
        "prog/min",
        "hit rate",
        "recomp Mtok",
        "SLO",
        "Jain",
        "JCT/ideal",
    ]
    rows = []
    for load in cfg["loads"]:
        key = _fmt_load(load)
        for system in cfg["systems"]:
            m = results[system].get(key)
            if not m:
                continue
            rows.append(
                [
                    system,
                    key,
                    m["jct_mean_s"],
                    m["jct_p50_s"],
                    m["jct_p95_s"],
                    m["jct_p99_s"],
                    m["throughput_per_min"],
                    m["hit_rate"],
                    m["recomputed_tokens"] / 1e6,
                    m["slo_attainment"],
                    m["jain"],
                    m["jct_over_ideal_mean"],
                ]
            )
    title = (
        f"bench agents: {cfg['workload']} on {cfg['replicas']} x {cfg['profile']} "
        f"(KV {cfg['kv_tokens_per_replica']:,} tokens each), "
        f"{cfg['programs']} programs, seed {cfg['seed']}, vllm saturation "
        f"{cfg['saturation_per_min']:.2f}/min"
    )
    console = Console(width=max(Console().width, 150))
    print_table(title, cols, rows, console=console)
    ratio_rows = []
    for load, r in report["ratios"].items():
        ratio_rows.append(
            [
                load,
                r.get("jct_mean_vs_vllm", float("nan")),
                r.get("jct_p99_vs_vllm", float("nan")),
                r.get("jct_mean_vs_continuum", float("nan")),
                r.get("throughput_vs_vllm", float("nan")),
            ]
        )
    print_table(
        "treadle's ratios (higher is better for treadle)",
        ["load", "mean JCT vs vllm", "p99 JCT vs vllm", "mean JCT vs continuum", "thr vs vllm"],
        ratio_rows,
        console=console,
    )


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


# -- the command -----------------------------------------------------------------------------


def _parse_loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--load takes numbers separated by commas, got {text!r}"
        ) from None
    if not loads or any(not 0 < x <= 5 for x in loads):
        raise typer.BadParameter("--load values must be in (0, 5] (fractions of saturation)")
    return loads


def main(
    workload: Annotated[
        str, typer.Option("--workload", help=f"One of: {', '.join(WORKLOADS)}.")
    ] = "swe",
    load: Annotated[
        str,
        typer.Option("--load", help="Loads as fractions of vllm's saturation, comma separated."),
    ] = DEFAULT_LOAD_TEXT,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Engine replicas.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Workload seed.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="One small point (< 20 s).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    programs: Annotated[
        int | None, typer.Option("--programs", min=4, help="Programs per load point.")
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
    saturation: Annotated[
        float | None,
        typer.Option("--saturation", help="Skip the search: vllm's saturation in programs/min."),
    ] = None,
    slo_factor: Annotated[
        float, typer.Option("--slo-factor", help="SLO: JCT <= this x the program's ideal.")
    ] = 2.0,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes for the load points.")
    ] = min(2, os.cpu_count() or 1),
    micro: Annotated[
        bool, typer.Option("--micro", help="Only time the scheduler core at 10,000 queued calls.")
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", help="sim, or llamacpp: a real llama-server (realengine).")
    ] = "sim",
) -> None:
    """Whole agent programs on a simulated cluster: treadle vs vllm, continuum, autellix."""
    if engine != "sim":
        from treadle.benchmarks.agents.realengine import run_cli

        run_cli(engine, quick=quick, json_path=json_path, seed=seed, profile=profile)
        return
    if micro:
        m = micro_benchmark()
        print_table(
            "scheduler core: one decision (complete + submit + dispatch)",
            ["queued calls", "decisions", "us per decision"],
            [[int(m["queued_calls"]), int(m["decisions"]), m["us_per_decision"]]],
        )
        if json_path is not None:
            write_report(json_path, "agents-micro", {"queued": 10_000}, {"scheduler": m}, {})
        return
    if workload not in WORKLOADS:
        raise typer.BadParameter(
            f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}"
        )
    system_list = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [s for s in system_list if s not in SYSTEMS]
    if unknown:
        raise typer.BadParameter(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    load_list = _parse_loads(load)
    if quick:
        load_list = [0.9] if load == DEFAULT_LOAD_TEXT else load_list[:1]
    n_programs = programs or (QUICK_PROGRAMS if quick else DEFAULT_PROGRAMS[workload])
    sat_programs = n_programs if quick or programs else SATURATION_PROGRAMS[workload]
    report = run_bench(
        workload_name=workload,
        loads=load_list,
        cluster=ClusterSpec(replicas, profile, kv_tokens),
        seed=seed,
        programs=n_programs,
        systems=system_list,
        saturation_programs=sat_programs,
        slo_factor=slo_factor,
        workers=workers,
        saturation_per_min=saturation,
        log=typer.echo,
    )
    typer.echo(f"workload parameters: {report['config']['workload_params']}")
    print_report(report)
    write_report(json_path, "agents", report["config"], report["results"], report["ratios"])
    if json_path is not None:
        typer.echo(f"wrote {json_path}")


if __name__ == "__main__":
    typer.run(main)
