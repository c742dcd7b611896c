"""The report of `treadle bench agents`: its JSON shape and its tables.

`results[SYSTEM]`: `capacity_per_min`; `at_ref_load` {`jct_mean_s`, `jct_p50_s`,
`jct_p99_s`, `jct_over_ideal_mean`, `throughput_per_min`, `hit_rate`,
`recomputed_tokens`, `preemptions`}; `overload_goodput` (programs/min at 1.5 x its
capacity); `details` (the grid it walked, the throughput at capacity and the goodput
ratio, the tenants' figures, the frontend's counters). `ratios` (treadle's):
`capacity_vs_vllm`, `capacity_vs_continuum`, `capacity_vs_autellix`, `capacity_vs_bound`,
`jct_mean_vs_vllm`, `jct_mean_vs_continuum`, `jct_p99_vs_vllm` (the other system's JCT
over treadle's: higher is better for treadle), `overload_goodput_vs_capacity`, and with
several tenants `jain` (at the reference load) and `tenant_share_vs_weight` (each
tenant's share of the GPU token-time under overload over its weight's share).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.console import Console

from treadle.backends.sim import Profile
from treadle.benchmarks.agents.sim import PointResult
from treadle.benchmarks.agents.spec import BenchOutcome
from treadle.benchmarks.common import mean, percentile, print_table
from treadle.runtime.sched.fairness import jain_index

NAN = float("nan")
#: overload is this many times each system's own capacity
OVERLOAD_FACTOR = 1.5


def at_load(results: list[PointResult]) -> dict[str, float]:
    """The reference-load figures over every seed's run (programs pooled)."""
    if not results:
        return {}
    jcts = [j for r in results for j, _, _ in r.measured]
    ratios = [j / i for r in results for j, i, _ in r.measured]
    prompt = sum(r.prompt_tokens for r in results)
    return {
        "jct_mean_s": mean(jcts),
        "jct_p50_s": percentile(jcts, 0.5),
        "jct_p99_s": percentile(jcts, 0.99),
        "jct_over_ideal_mean": mean(ratios),
        "throughput_per_min": mean([r.throughput_per_min for r in results]),
        "hit_rate": sum(r.hit_tokens for r in results) / prompt if prompt else 0.0,
        "recomputed_tokens": mean([float(r.recomputed_tokens) for r in results]),
        "preemptions": mean([float(r.preemptions) for r in results]),
    }


def tenant_shares(results: list[PointResult], weights: dict[str, float]) -> dict[str, float]:
    """Each tenant's share of the token-time over its weight's share (1 = exactly fair)."""
    service: dict[str, float] = {}
    for r in results:
        for t, s in r.tenant_service_s.items():
            service[t] = service.get(t, 0.0) + s
    total = sum(service.values())
    wsum = sum(weights.values())
    if not total or not wsum:
        return {}
    return {t: (service.get(t, 0.0) / total) / (w / wsum) for t, w in sorted(weights.items())}


def jain_at(results: list[PointResult]) -> float:
    by: dict[str, list[float]] = {}
    for r in results:
        for j, i, t in r.measured:
            by.setdefault(t, []).append(j / i)
    return jain_index(mean(v) for v in by.values())


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return NAN
    return a / b


def build_report(outcome: BenchOutcome) -> dict[str, Any]:
    spec = outcome.spec
    workload = spec.source.load(spec.seeds[0])
    weights = dict(workload.tenants)
    many_tenants = len(weights) > 1
    results: dict[str, dict[str, Any]] = {}
    for name, search in outcome.searches.items():
        cap = search.capacity()
        at_cap = search.throughput_at(cap) if not math.isnan(cap) else NAN
        over = outcome.overload.get(name, [])
        goodput = mean([r.throughput_per_min for r in over]) if over else NAN
        ref = outcome.at_ref.get(name, [])
        details: dict[str, Any] = {
            "capacity_capped": search.capped,
            "grid": [[round(r, 4), s, t] for r, s, t in search.table()],
            "throughput_at_capacity": at_cap,
            "overload_rate_per_min": OVERLOAD_FACTOR * cap,
            "overload_goodput_vs_capacity": _ratio(goodput, at_cap),
            "overload_slowdown": mean([r.slowdown for r in over]) if over else NAN,
            "busy_at_ref": mean([r.busy for r in ref]) if ref else NAN,
            "pins_at_ref": _sum_dicts(r.pins for r in ref),
            "frontend_at_ref": ref[0].frontend if ref else {},
        }
        if many_tenants:
            details["jain"] = jain_at(ref)
            details["tenants_slowdown_at_ref"] = _tenant_slowdowns(ref)
            details["tenant_share_vs_weight"] = tenant_shares(over, weights)
        results[name] = {
            "capacity_per_min": cap,
            "at_ref_load": at_load(ref),
            "overload_goodput": goodput,
            "details": details,
        }
    ratios = treadle_ratios(results, many_tenants)
    config = {
        "workload": spec.source.workload,
        "trace": spec.source.trace,
        "workload_params": workload.params,
        "programs": spec.source.programs,
        "seeds": list(spec.seeds),
        "replicas": spec.cluster.replicas,
        "profile": spec.cluster.profile,
        "kv_tokens_per_replica": spec.cluster.kv_tokens or _profile_kv(spec.cluster.profile),
        "systems": list(spec.systems),
        "slo_factor": spec.slo_factor,
        "grid_start_per_min": outcome.grid.start_per_min,
        "grid_step": outcome.grid.step,
        "reference_per_min": outcome.reference_per_min,
        "overload_factor": OVERLOAD_FACTOR,
        "ideal_jct_mean_s": outcome.ideal_mean_s,
        "tenant_weights": weights,
        "wall_s": outcome.wall_s,
        "workers": spec.workers,
    }
    return {"config": config, "results": results, "ratios": ratios}


def _profile_kv(profile: str) -> int:
    return Profile.load(profile).kv_capacity_tokens


def _sum_dicts(ds: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _tenant_slowdowns(results: list[PointResult]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in results:
        for t, v in r.tenant_slowdowns().items():
            by.setdefault(t, []).append(v)
    return {t: statistics.fmean(v) for t, v in sorted(by.items())}


def treadle_ratios(results: dict[str, dict[str, Any]], many_tenants: bool) -> dict[str, Any]:
    t = results.get("treadle")
    if t is None:
        return {}

    def cap(name: str) -> float | None:
        r = results.get(name)
        return None if r is None else r["capacity_per_min"]

    def ref(name: str, key: str) -> float | None:
        r = results.get(name)
        return None if r is None else r["at_ref_load"].get(key)

    out: dict[str, Any] = {
        "capacity_vs_vllm": _ratio(t["capacity_per_min"], cap("vllm")),
        "capacity_vs_continuum": _ratio(t["capacity_per_min"], cap("continuum")),
        "capacity_vs_autellix": _ratio(t["capacity_per_min"], cap("autellix")),
        "capacity_vs_bound": _ratio(t["capacity_per_min"], cap("bound")),
        "jct_mean_vs_vllm": _ratio(ref("vllm", "jct_mean_s"), ref("treadle", "jct_mean_s")),
        "jct_mean_vs_continuum": _ratio(
            ref("continuum", "jct_mean_s"), ref("treadle", "jct_mean_s")
        ),
        "jct_p99_vs_vllm": _ratio(ref("vllm", "jct_p99_s"), ref("treadle", "jct_p99_s")),
        "overload_goodput_vs_capacity": t["details"]["overload_goodput_vs_capacity"],
    }
    if many_tenants:
        out["jain"] = t["details"]["jain"]
        out["tenant_share_vs_weight"] = t["details"]["tenant_share_vs_weight"]
    return out


def print_report(report: dict[str, Any], *, console: Console | None = None) -> None:
    console = console or Console()
    cfg = report["config"]
    results = report["results"]
    source = cfg["trace"] or cfg["workload"]
    head = (
        f"{source} on {cfg['replicas']} x {cfg['profile']} (KV {cfg['kv_tokens_per_replica']:,}"
        f" tokens each), {cfg['programs']} programs x {len(cfg['seeds'])} seeds"
    )
    vllm_cap = results.get("vllm", {}).get("capacity_per_min")
    bound_cap = results.get("bound", {}).get("capacity_per_min")
    rows = []
    for name, r in results.items():
        grid = " ".join(f"{rate:.3g}:{s:.2f}" for rate, s, _ in r["details"]["grid"])
        cap = r["capacity_per_min"]
        rows.append(
            [
                name,
                cap,
                _ratio(cap, vllm_cap),
                _ratio(cap, bound_cap),
                ("capped " if r["details"]["capacity_capped"] else "") + grid,
            ]
        )
    print_table(
        f"capacity (programs/min with mean JCT <= {cfg['slo_factor']:g} x ideal): {head}",
        ["system", "capacity/min", "vs vllm", "vs bound", "grid (rate:mean JCT/ideal)"],
        rows,
        console=console,
    )
    rows = []
    for name, r in results.items():
        m = r["at_ref_load"]
        if not m:
            continue
        rows.append(
            [
                name,
                m["jct_mean_s"],
                m["jct_p50_s"],
                m["jct_p99_s"],
                m["jct_over_ideal_mean"],
                m["throughput_per_min"],
                m["hit_rate"],
                m["recomputed_tokens"] / 1e6,
                m["preemptions"],
            ]
        )
    print_table(
        f"at the reference load, {cfg['reference_per_min']:.2f} programs/min (vllm's capacity)",
        [
            "system",
            "JCT mean s",
            "p50",
            "p99",
            "JCT/ideal",
            "prog/min",
            "hit rate",
            "recomp Mtok",
            "preempt",
        ],
        rows,
        console=console,
    )
    rows = [
        [
            name,
            r["details"]["overload_rate_per_min"],
            r["overload_goodput"],
            r["details"]["throughput_at_capacity"],
            r["details"]["overload_goodput_vs_capacity"],
        ]
        for name, r in results.items()
    ]
    print_table(
        f"goodput under overload ({cfg['overload_factor']:g} x each system's capacity)",
        ["system", "rate/min", "prog/min", "prog/min at capacity", "ratio"],
        rows,
        console=console,
    )
    if len(cfg["tenant_weights"]) > 1:
        tenants = sorted(cfg["tenant_weights"])
        rows = [
            [name, r["details"]["jain"]]
            + [r["details"]["tenant_share_vs_weight"].get(t, NAN) for t in tenants]
            for name, r in results.items()
        ]
        print_table(
            "tenants: Jain's index at the reference load; token-time share / weight share "
            "under overload",
            ["system", "Jain", *tenants],
            rows,
            console=console,
        )
    ratios = report["ratios"]
    if ratios:
        flat = [(k, v) for k, v in ratios.items() if not isinstance(v, dict)]
        print_table(
            "treadle's ratios (higher is better for treadle)",
            [k for k, _ in flat],
            [[v for _, v in flat]],
            console=console,
        )
    console.print(f"{cfg['wall_s']:.1f} s on {cfg['workers']} processes")
