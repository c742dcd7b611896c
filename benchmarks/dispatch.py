"""`treadle bench dispatch`: prefix-aware routing across simulated replicas.

A request trace is replayed on N simulated engine replicas (`treadle.backends.sim`, one
shared virtual clock) under each routing policy of `treadle.backends.dispatch.routing`
(`round_robin`, `least_load`, `cache_aware`, `treadle`), in the same process, on the same
inputs. Inputs: the Mooncake conversation trace (JSONL, `hash_ids` = one id per 512-token
block, equal ids = equal content) or the Azure 2023 CSV (no content ids: every prompt is
unique).

Metrics per policy:
- `hit_rate`: prompt tokens served from the prefix cache / prompt tokens, at the reference
  rate (`--ref-scale`, default the trace's own rate);
- `pooled_hit_rate`: the same trace through ONE cache with all replicas' capacity (the
  simulator's own block cache, LRU, fed in arrival order) — what perfect routing with
  no load limits could reach; `hit_rate_vs_pooled` is the ratio;
- `predicted_hit_rate`: what the policy's own prefix index expected to hit (0 for policies
  without one): how well it mirrors the engines' caches;
- `ttft_p50_s`, `ttft_p99_s`: time to first token at the reference rate;
- `capacity_scale` / `capacity_rps`: the highest arrival-rate scale (arrival times divided
  by the scale) at which p99 TTFT meets the SLO, found by bracketing then bisection;
- `refused`: requests longer than the model's context (prompt plus output over
  `max_model_len`, or over a replica's KV cache): a replica refuses them at once, as vLLM
  answers 400, so they are routed (the router cannot know) and then left out of hit rates,
  TTFTs and the SLO. (The published Mooncake traces hold a few such requests.)

The SLO (`--slo-mode`): `absolute` — p99 of TTFT <= `--slo-s`; `slack` — p99 of (TTFT minus
the request's own prefill time alone on an idle replica without cache) <= `--slo-s`, i.e.
each request may wait `--slo-s` beyond its own compute; `auto` (default) — `absolute` unless
the trace makes it unreachable: when even a perfect router (every request alone, with every
earlier prompt cached) has p99 TTFT above the SLO, no policy can meet it at any rate, and
`slack` is used instead (said in the output and the report's config).

Arrival times: Mooncake's timestamps are recorded at 1 s resolution (about 10 requests share
each stamp); slowing the trace down never separates them, so arrivals within one recorded
second are spread uniformly over it with a seeded RNG (`--seed`). Traces with finer stamps
are replayed as recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from treadle.backends.dispatch.routing import (
    ROUTING_POLICIES,
    CacheAwareConfig,
    RequestFeatures,
    Router,
    RoutingPolicy,
    TreadleRoutingConfig,
    chain_block_ids,
    make_routing_policy,
)
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, SimRequest
from treadle.backends.sim.kvcache import BlockCache
from treadle.backends.sim.profile import DEFAULT_PROFILE, Profile
from treadle.backends.sim.trace import MOONCAKE_BLOCK_TOKENS, TraceRow, load_azure, load_mooncake
from treadle.benchmarks.common import data_dir, percentile, print_table, write_report

SloMode = Literal["auto", "absolute", "slack"]
DEFAULT_TRACE = Path("mooncake") / "conversation_trace.jsonl"
#: routing chunk: one Mooncake block (the trace's content granularity)
CHUNK_TOKENS = MOONCAKE_BLOCK_TOKENS
#: capacity search range, in multiples of the trace's own arrival rate
MIN_SCALE, MAX_SCALE = 1 / 64, 64.0


# -- the workload ---------------------------------------------------------------------------


@dataclass
class Workload:
    """A trace ready to replay: rows in arrival order and their routing keys."""

    name: str
    rows: list[TraceRow]
    chunks: list[tuple[int, ...]]
    jitter_s: float

    @property
    def span_s(self) -> float:
        return self.rows[-1].arrival_s - self.rows[0].arrival_s if len(self.rows) > 1 else 0.0

    @property
    def base_rps(self) -> float:
        return len(self.rows) / self.span_s if self.span_s > 0 else float("nan")


def stamp_resolution_s(rows: Sequence[TraceRow]) -> float:
    """1.0 when the trace's timestamps sit on whole seconds (within 5 ms), else 0."""
    on_second = sum(1 for r in rows if abs(r.arrival_s - round(r.arrival_s)) <= 0.005)
    return 1.0 if rows and on_second >= 0.99 * len(rows) else 0.0


def _routing_keys(row: TraceRow, index: int) -> tuple[int, ...]:
    if row.hash_ids is None:
        # Unique content: keys nobody shares, so trees still grow as sgl-router's would.
        n_blocks = -(-row.input_length // CHUNK_TOKENS)
        return chain_block_ids([("unique", index, j) for j in range(n_blocks)])
    ids = row.hash_ids
    last = row.input_length - (len(ids) - 1) * CHUNK_TOKENS
    # The simulator treats a partial last block as different content from a full block
    # of the same id; the keys do too.
    return chain_block_ids([(h, CHUNK_TOKENS) for h in ids[:-1]] + [(ids[-1], last)])


def load_workload(path: Path, *, limit: int | None, seed: int) -> Workload:
    """Read a Mooncake JSONL or Azure CSV trace; de-quantize 1 s timestamps (module doc)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"trace {path} not found (set --trace, or TREADLE_DATA to the data folder)"
        )
    if path.suffix == ".csv":
        rows = load_azure(path, limit=limit)
    elif path.suffix in (".jsonl", ".json"):
        rows = load_mooncake(path, limit=limit)
    else:
        raise ValueError(f"unknown trace format {path.suffix!r}: use Mooncake .jsonl or Azure .csv")
    if not rows:
        raise ValueError(f"trace {path} holds no requests")
    rows = [r for r in rows if r.input_length >= 1]
    jitter = stamp_resolution_s(rows)
    if jitter:
        rng = random.Random(seed)
        rows = [dataclasses.replace(r, arrival_s=r.arrival_s + rng.random() * jitter) for r in rows]
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    rows = [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in rows]
    return Workload(
        name=path.name,
        rows=rows,
        chunks=[_routing_keys(r, i) for i, r in enumerate(rows)],
        jitter_s=jitter,
    )


def _served(workload: Workload, refused: frozenset[int]) -> Workload:
    """The workload without the requests a server refuses."""
    if not refused:
        return workload
    keep = [i for i in range(len(workload.rows)) if i not in refused]
    return dataclasses.replace(
        workload,
        rows=[workload.rows[i] for i in keep],
        chunks=[workload.chunks[i] for i in keep],
    )


# -- what no router can beat -------------------------------------------------------------------


def pooled_cache_hits(workload: Workload, total_blocks: int, block_size: int) -> list[int]:
    """Per request, the prompt tokens one LRU cache of `total_blocks` would serve, fed the
    trace in arrival order (the simulator's `BlockCache`, the engine's hit rule: at most
    prompt - 1 tokens reused). Each request is cached and released before the next, so no
    block is ever held by a running request: an upper bound for any routing."""
    cache = BlockCache(total_blocks)
    hits: list[int] = []
    for row in workload.rows:
        prompt = row.prompt(block_size)
        n = prompt.num_tokens
        limit = n // block_size
        matched, mblocks = cache.match(prompt.keys, prompt.ends, limit)
        hits.append(min(mblocks * block_size, n - 1))
        cache.acquire(matched)
        held = list(matched)
        prev = mblocks
        for key, end in zip(prompt.keys[len(matched) :], prompt.ends[len(matched) :], strict=True):
            if end > limit:
                break
            nb = end - prev
            if nb > cache.available:
                break  # a prompt larger than the whole cache: keep what fits
            cache.allocate(nb)
            held.append(cache.register(key, nb))
            prev = end
        cache.release(held)
    return hits


def absolute_floor_p99(
    profile: Profile, workload: Workload, unbounded_hits: Sequence[int]
) -> float:
    """p99 over requests of the TTFT each would have alone on an idle replica that holds
    every earlier prompt: a lower bound of p99 TTFT for every policy at every rate."""
    floors = [
        profile.prefill_time(row.input_length, cached=min(hit, row.input_length - 1))
        for row, hit in zip(workload.rows, unbounded_hits, strict=True)
    ]
    return percentile(floors, 0.99)


# -- one replay ------------------------------------------------------------------------------


class _SloBroken(Exception):
    """Raised inside the simulation once p99 can no longer meet the SLO (stops it early)."""


class _AllStarted(Exception):
    """Raised once every request has its first token: nothing left to measure."""


@dataclass
class RunResult:
    policy: str
    scale: float
    passed: bool
    completed: bool
    hit_rate: float = float("nan")
    #: prompt tokens the policy's own index expected to be cached / prompt tokens
    predicted_hit_rate: float = float("nan")
    ttft_p50_s: float = float("nan")
    ttft_p99_s: float = float("nan")
    slo_p99_s: float = float("nan")
    wall_s: float = 0.0
    #: requests the replicas refused (400: longer than the context)
    refused: int = 0


@dataclass
class Bench:
    """Everything fixed across the runs of one benchmark invocation."""

    workload: Workload
    profile: Profile
    replicas: int
    slo_s: float
    slo_mode: Literal["absolute", "slack"]
    cold_prefill_s: list[float]
    #: rows a server refuses (longer than the context): routed, answered 400, never run
    refused: frozenset[int] = frozenset()
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: int = 0

    def make_routing_policy(self, name: str) -> RoutingPolicy:
        return make_routing_policy(name, self.replicas, **self.policy_options.get(name, {}))

    def slo_value(self, index: int, ttft: float) -> float:
        """What the SLO bounds for request `index` (module doc: absolute or slack)."""
        if self.slo_mode == "slack":
            return ttft - self.cold_prefill_s[index]
        return ttft

    def simulate(self, policy_name: str, scale: float, *, early_stop: bool) -> RunResult:
        """Replay the trace at `scale` x its rate; with `early_stop`, stop as soon as the
        SLO is known to fail or every request has its first token."""
        started = time.perf_counter()
        self.runs += 1
        rows = self.workload.rows
        refused = self.refused
        n = len(rows) - len(refused)  # the requests that run
        clock = VirtualClock()
        engines = [Engine(self.profile, clock, name=f"replica-{i}") for i in range(self.replicas)]
        router = Router(self.make_routing_policy(policy_name), [e.name for e in engines])
        block_size = engines[0].block_size
        # p99 (linear interpolation) exceeds the SLO once data[floor(0.99 (n-1))] does,
        # i.e. once n - floor(0.99 (n-1)) values exceed it
        allowed = n - math.floor(0.99 * (n - 1)) - 1
        state = {"violations": 0, "started": 0}
        requests: list[SimRequest] = []

        def first_token(req: SimRequest) -> None:
            ticket = req.tag
            router.prefill_done(ticket)
            state["started"] += 1
            assert req.ttft is not None
            if self.slo_value(int(req.request_id), req.ttft) > self.slo_s:
                state["violations"] += 1
                if early_stop and state["violations"] > allowed:
                    raise _SloBroken
            if early_stop and state["started"] == n:
                raise _AllStarted

        def finish(req: SimRequest) -> None:
            router.finish(req.tag, now=clock.now(), cached_tokens=req.cached_tokens)

        def arrive(i: int) -> None:
            row = rows[i]
            features = RequestFeatures(
                chunks=self.workload.chunks[i],
                prompt_tokens=row.input_length,
                chunk_tokens=CHUNK_TOKENS,
                output_tokens=row.output_length,
                now=clock.now(),
            )
            ticket = router.route(features)  # a router cannot tell before the server says
            if i in refused:
                router.finish(ticket, now=clock.now(), ok=False)  # 400 at once
            else:
                req = row.request(
                    block_size,
                    request_id=str(i),
                    on_first_token=first_token,
                    on_finish=finish,
                    tag=ticket,
                )
                requests.append(req)
                engines[ticket.replica].submit(req)
            if i + 1 < len(rows):
                clock.schedule(rows[i + 1].arrival_s / scale, lambda: arrive(i + 1))

        clock.schedule(rows[0].arrival_s / scale, lambda: arrive(0))
        completed = True
        try:
            clock.run()
        except _SloBroken:
            completed = False
        except _AllStarted:
            pass
        wall = time.perf_counter() - started
        if not completed:
            return RunResult(
                policy_name, scale, passed=False, completed=False, wall_s=wall, refused=len(refused)
            )
        ttfts = [r.ttft for r in requests if r.ttft is not None]
        if len(ttfts) != n:
            raise RuntimeError(f"{policy_name} at scale {scale}: {n - len(ttfts)} requests lost")
        slo_values = [self.slo_value(int(r.request_id), r.ttft or 0.0) for r in requests]
        slo_p99 = percentile(slo_values, 0.99)
        prompt_tokens = sum(r.prompt_tokens for r in requests)
        cached = sum(r.cached_tokens or 0 for r in requests)
        predicted = sum(r.tag.predicted_cached_tokens for r in requests)
        return RunResult(
            policy_name,
            scale,
            passed=slo_p99 <= self.slo_s,
            completed=True,
            hit_rate=cached / prompt_tokens if prompt_tokens else 0.0,
            predicted_hit_rate=predicted / prompt_tokens if prompt_tokens else 0.0,
            ttft_p50_s=percentile(ttfts, 0.5),
            ttft_p99_s=percentile(ttfts, 0.99),
            slo_p99_s=slo_p99,
            wall_s=wall,
            refused=len(refused),
        )

    def capacity(
        self, policy_name: str, *, known: dict[float, bool], tolerance: float
    ) -> tuple[float, int]:
        """The highest passing scale: bracket by doubling/halving from 1, then bisect in
        log space until hi/lo <= 1 + tolerance. Returns (scale, runs); 0.0 when even
        MIN_SCALE fails."""
        runs = 0

        def passes(scale: float) -> bool:
            nonlocal runs
            if scale not in known:
                runs += 1
                known[scale] = self.simulate(policy_name, scale, early_stop=True).passed
            return known[scale]

        if passes(1.0):
            lo, hi = 1.0, 2.0
            while passes(hi):
                lo, hi = hi, hi * 2
                if hi > MAX_SCALE:
                    return lo, runs
        else:
            lo, hi = 0.5, 1.0
            while not passes(lo):
                lo, hi = lo / 2, lo
                if lo < MIN_SCALE:
                    return 0.0, runs
        while hi / lo > 1 + tolerance:
            mid = math.sqrt(lo * hi)
            if passes(mid):
                lo = mid
            else:
                hi = mid
        return lo, runs


# -- the benchmark ---------------------------------------------------------------------------


def run_bench(
    *,
    trace: Path,
    replicas: int,
    slo_s: float,
    slo_mode: SloMode,
    profile_name: str,
    requests: int | None,
    seed: int,
    ref_scale: float,
    tolerance: float,
    policies: Sequence[str] = ROUTING_POLICIES,
    echo: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Run every policy; returns (config, results, ratios) in the report's shape."""
    if replicas < 1:
        raise ValueError("--replicas must be >= 1")
    if slo_s <= 0:
        raise ValueError("--slo-s must be > 0")
    unknown = [p for p in policies if p not in ROUTING_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(ROUTING_POLICIES)}")
    profile = Profile.load(profile_name)
    workload = load_workload(trace, limit=requests, seed=seed)
    block_size = profile.engine.block_size
    # a server refuses (400) a request whose prompt plus max_tokens exceeds its context, as
    # vLLM does; the benchmark counts those and replays the rest (module doc)
    fits = min(profile.model.max_model_len, profile.kv_capacity_tokens)
    refused = frozenset(
        i for i, r in enumerate(workload.rows) if r.input_length + r.output_length > fits
    )
    if len(refused) == len(workload.rows):
        raise ValueError(f"every request is longer than {profile.name}'s context ({fits} tokens)")
    served = _served(workload, refused)

    pooled_blocks = profile.kv_capacity_blocks * replicas
    pooled = pooled_cache_hits(served, pooled_blocks, block_size)
    unbounded = pooled_cache_hits(served, 1 << 40, block_size)
    prompt_tokens = sum(r.input_length for r in served.rows)
    pooled_hit_rate = sum(pooled) / prompt_tokens
    floor_p99 = absolute_floor_p99(profile, served, unbounded)
    if slo_mode == "auto":
        mode_used: Literal["absolute", "slack"] = "absolute" if floor_p99 <= slo_s else "slack"
    else:
        mode_used = slo_mode
    cold = [profile.prefill_time(r.input_length) for r in workload.rows]
    prefill_tps = profile.prefill_tokens_per_s(profile.engine.max_num_batched_tokens)
    bench = Bench(
        workload=workload,
        profile=profile,
        replicas=replicas,
        slo_s=slo_s,
        slo_mode=mode_used,
        cold_prefill_s=cold,
        refused=refused,
        policy_options={
            "cache_aware": {},  # sgl-router's command-line defaults
            "treadle": {
                "prefill_tokens_per_s": prefill_tps,
                "prefill_time_s": functools.lru_cache(maxsize=1 << 16)(profile.prefill_time),
                "capacity_chunks": profile.kv_capacity_tokens // CHUNK_TOKENS,
            },
        },
    )
    config: dict[str, Any] = {
        "trace": str(trace),
        "requests": len(workload.rows),
        "refused_requests": len(refused),
        "max_model_len": profile.model.max_model_len,
        "trace_span_s": round(workload.span_s, 3),
        "base_rps": workload.base_rps,
        "arrival_jitter_s": workload.jitter_s,
        "seed": seed,
        "profile": profile.name,
        "replicas": replicas,
        "kv_capacity_tokens_per_replica": profile.kv_capacity_tokens,
        "slo_s": slo_s,
        "slo_percentile": 0.99,
        "slo_mode_requested": slo_mode,
        "slo_mode": mode_used,
        "absolute_floor_p99_ttft_s": floor_p99,
        "ref_scale": ref_scale,
        "tolerance": tolerance,
        "policies": list(policies),
        "cache_aware": dataclasses.asdict(CacheAwareConfig(**bench.policy_options["cache_aware"])),
        "treadle": {
            **dataclasses.asdict(TreadleRoutingConfig(**bench.policy_options["treadle"])),
            "prefill_time_s": f"{profile.name} Profile.prefill_time",
        },
    }
    echo(
        f"bench dispatch: {workload.name}, {len(workload.rows)} requests over "
        f"{workload.span_s:,.0f} s ({workload.base_rps:.2f} req/s), arrival jitter "
        f"{workload.jitter_s:g} s, seed {seed}; profile {profile.name}; {replicas} replicas"
    )
    echo(
        f"SLO: p99 {'TTFT' if mode_used == 'absolute' else 'TTFT beyond own cold prefill'} "
        f"<= {slo_s:g} s (mode {mode_used}, requested {slo_mode}); a perfect router's p99 "
        f"TTFT floor is {floor_p99:.2f} s"
    )
    if refused:
        echo(
            f"  {len(refused)} requests are longer than the model's context ({fits} tokens, "
            f"prompt plus output): each replica refuses them at once (400), as vLLM does; "
            f"they are counted per policy and left out of hit rates and TTFTs"
        )
    if slo_mode == "auto" and mode_used == "slack":
        echo(
            f"  the absolute SLO is unreachable here: requests alone on an idle replica with "
            f"every earlier prompt cached still have p99 TTFT {floor_p99:.2f} s > {slo_s:g} s, "
            f"so every policy's capacity would be 0; using the slack SLO instead"
        )

    results: dict[str, dict[str, Any]] = {}
    for name in policies:
        ref = bench.simulate(name, ref_scale, early_stop=False)
        known = {ref_scale: ref.passed}
        scale, runs = bench.capacity(name, known=known, tolerance=tolerance)
        results[name] = {
            "hit_rate": ref.hit_rate,
            "pooled_hit_rate": pooled_hit_rate,
            "hit_rate_vs_pooled": ref.hit_rate / pooled_hit_rate if pooled_hit_rate else None,
            "predicted_hit_rate": ref.predicted_hit_rate,
            "ttft_p50_s": ref.ttft_p50_s,
            "ttft_p99_s": ref.ttft_p99_s,
            "slo_p99_s": ref.slo_p99_s,
            "capacity_scale": scale,
            "capacity_rps": scale * workload.base_rps,
            "refused": ref.refused,
            "runs": runs + 1,
        }
        echo(
            f"  {name}: capacity {scale:.3f}x ({scale * workload.base_rps:.2f} req/s) "
            f"after {runs + 1} runs"
        )

    ratios: dict[str, Any] = {}
    if "treadle" in results:
        mine = results["treadle"]["capacity_rps"]
        for base in ("round_robin", "cache_aware", "least_load"):
            if base in results:
                theirs = results[base]["capacity_rps"]
                # capacity 0 (fails even at the lowest rate tried): no finite ratio
                ratios[f"capacity_vs_{base}"] = mine / theirs if theirs > 0 else None
    config["simulation_runs"] = bench.runs
    return config, results, ratios


def main(
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="Mooncake .jsonl or Azure .csv trace (default: Mooncake)."),
    ] = None,
    replicas: Annotated[int, typer.Option("--replicas", help="Simulated replicas.")] = 8,
    slo_s: Annotated[float, typer.Option("--slo-s", help="p99 TTFT SLO in seconds.")] = 2.0,
    slo_mode: Annotated[
        str, typer.Option("--slo-mode", help="auto, absolute or slack (see module doc).")
    ] = "auto",
    quick: Annotated[
        bool, typer.Option("--quick", help="2,000 requests, coarse bisection: a smoke run.")
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    profile: Annotated[
        str, typer.Option("--profile", help="Simulator profile name or .json path.")
    ] = DEFAULT_PROFILE,
    requests: Annotated[
        int | None, typer.Option("--requests", help="Replay only the first N requests.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the arrival jitter.")] = 0,
    ref_scale: Annotated[
        float, typer.Option("--ref-scale", help="Rate scale for hit rate and TTFT columns.")
    ] = 1.0,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Bisection stops at hi/lo <= 1 + this.")
    ] = 0.03,
    engine: Annotated[
        str,
        typer.Option(
            "--engine", help="sim, or llamacpp: three real llama-servers (dispatch_llamacpp)."
        ),
    ] = "sim",
    reps: Annotated[int, typer.Option("--reps", help="llamacpp: repetitions (medians).")] = 5,
) -> None:
    """Prefix-aware dispatch: replay a trace on simulated replicas under each policy."""
    if engine == "llamacpp":
        _main_llamacpp(trace, requests, reps, quick, json_path, profile, seed)
        return
    if engine != "sim":
        raise typer.BadParameter("--engine must be sim or llamacpp")
    if slo_mode not in ("auto", "absolute", "slack"):
        raise typer.BadParameter("--slo-mode must be auto, absolute or slack")
    if quick:
        requests = min(requests or 2000, 2000)
        tolerance = max(tolerance, 0.15)
    path = trace if trace is not None else data_dir() / DEFAULT_TRACE
    console = Console()
    started = time.perf_counter()
    config, results, ratios = run_bench(
        trace=path,
        replicas=replicas,
        slo_s=slo_s,
        slo_mode=slo_mode,  # type: ignore[arg-type]
        profile_name=profile,
        requests=requests,
        seed=seed,
        ref_scale=ref_scale,
        tolerance=tolerance,
        echo=console.print,
    )
    config["quick"] = quick
    config["wall_s"] = round(time.perf_counter() - started, 2)
    rows = [
        [
            name,
            r["hit_rate"],
            r["predicted_hit_rate"],
            r["pooled_hit_rate"],
            r["ttft_p50_s"],
            r["ttft_p99_s"],
            r["slo_p99_s"],
            r["capacity_scale"],
            r["capacity_rps"],
            r["refused"],
        ]
        for name, r in results.items()
    ]
    slo_col = "p99 TTFT (SLO)" if config["slo_mode"] == "absolute" else "p99 TTFT-cold (SLO)"
    print_table(
        f"dispatch: {config['replicas']} x {config['profile']}, "
        f"at {config['ref_scale']:g}x trace rate; capacity at p99 <= {slo_s:g} s",
        [
            "policy",
            "hit rate",
            "index expected",
            "pooled hit rate",
            "TTFT p50 s",
            "TTFT p99 s",
            slo_col,
            "capacity x",
            "capacity req/s",
            "refused (400)",
        ],
        rows,
        console=console,
    )
    for key, value in ratios.items():
        console.print(f"{key}: {'n/a (baseline capacity 0)' if value is None else f'{value:.2f}x'}")
    console.print(f"{config['simulation_runs']} simulations in {config['wall_s']:.1f} s")
    write_report(json_path, "dispatch", config, results, ratios)


def _main_llamacpp(
    trace: Path | None,
    requests: int | None,
    reps: int,
    quick: bool,
    json_path: Path | None,
    profile: str,
    seed: int,
) -> None:
    from treadle.benchmarks import dispatch_llamacpp as real

    console = Console()
    started = time.perf_counter()
    config, results, ratios = real.run_llamacpp_dispatch(
        requests=requests or (40 if quick else 80),
        reps=max(1, reps),
        rate=6.0,
        block_tokens=24,
        max_output=24,
        profile_name=real.DEFAULT_PROFILE if profile == DEFAULT_PROFILE else profile,
        trace_path=trace if trace is not None else data_dir() / DEFAULT_TRACE,
        seed=seed,
        echo=console.print,
    )
    config["wall_s"] = round(time.perf_counter() - started, 1)
    rows = [
        [
            name,
            r["cached_prompt_tokens"],
            r["predicted"]["cached_prompt_tokens"],
            r["hit_rate"],
            r["predicted"]["hit_rate"],
            r["ttft_p50_s"],
            r["predicted"]["ttft_p50_s"],
            r["ttft_p99_s"],
            r["predicted"]["ttft_p99_s"],
        ]
        for name, r in results.items()
    ]
    print_table(
        f"dispatch on 3 llama-servers ({config['requests']} requests, medians of "
        f"{config['reps']}), beside the simulator ({config['profile']})",
        [
            "policy",
            "cached tokens",
            "sim",
            "hit rate",
            "sim",
            "TTFT p50 s",
            "sim",
            "TTFT p99 s",
            "sim",
        ],
        rows,
        console=console,
    )
    for key, value in ratios.items():
        console.print(f"{key}: {'n/a' if value is None else f'{value:.2f}x'}")
    write_report(json_path, "dispatch", config, results, ratios)
