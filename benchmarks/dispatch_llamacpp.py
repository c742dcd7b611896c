"""`treadle bench dispatch --engine llamacpp`: the routing policies on three real
`llama-server`s, each beside the simulator's prediction for the same setup.

The workload is the Mooncake conversation trace scaled down to what a CPU serves: whole
conversations (requests linked by a shared block beyond the common system block), in order
of their first request, their requests in arrival order, each cut to its first 24 blocks;
each 512-token block becomes `block_tokens` tokens of text fixed by its hash id (equal
ids, equal text), answers are capped at `max_output` tokens, arrivals are Poisson at
`rate` a second. Every repetition starts three fresh servers (the small random-weight
model, 4 slots each, llama.cpp's own host-RAM prompt cache on: the server at its best) and
replays the trace through `ReplicaPool` under each policy, streaming, so TTFT is the
client's. Cached prompt tokens are the servers' own
(`usage.prompt_tokens_details.cached_tokens`).

The prediction replays the same requests (same routing keys, same policies) on three
simulated engines with the calibrated profile (`--profile`, default the bundled
`llamacpp_cpu_small`, fitted by `treadle sim calibrate --engine llamacpp`).

Reported per policy (medians over `--reps` repetitions): `cached_prompt_tokens`,
`hit_rate`, `ttft_p50_s` / `ttft_p90_s` / `ttft_p99_s`, and `predicted` (the simulator's
same numbers); ratios: each policy's cached tokens and median TTFT against round robin's.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from treadle.backends.base import LLMRequest, Message
from treadle.backends.dispatch.pool import ReplicaPool
from treadle.backends.dispatch.routing import RequestFeatures, Router, make_routing_policy
from treadle.backends.openai_compat.llamacpp import LlamaCppBackend
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, SimRequest
from treadle.backends.sim.profile import Profile
from treadle.backends.sim.trace import TraceRow, load_mooncake
from treadle.benchmarks.common import percentile
from treadle.testing.llamacpp import MODEL_ALIAS, LlamaServers
from treadle.testing.tiny_gguf import SMALL, write_tiny_gguf

POLICIES = ("round_robin", "least_load", "cache_aware", "treadle")
DEFAULT_PROFILE = "llamacpp_cpu_small"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Scaled:
    """One trace request, scaled: its blocks' ids, its answer length, its arrival."""

    arrival_s: float
    blocks: tuple[int, ...]
    output: int


#: a request keeps at most its first this many blocks (its prefix structure survives)
MAX_BLOCKS = 24


def scale_trace(
    rows: Sequence[TraceRow], *, requests: int, rate: float, max_output: int, seed: int
) -> list[Scaled]:
    """Whole conversations (rows linked by a shared block beyond the common system block),
    in order of their first request, until `requests` rows; the rows in arrival order, each
    cut to its first `MAX_BLOCKS` blocks, re-timed as Poisson arrivals at `rate`."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_row: dict[int, int] = {}
    for i, row in enumerate(rows):
        for h in (row.hash_ids or ())[1:MAX_BLOCKS]:
            j = first_row.setdefault(h, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(root(i), []).append(i)
    picked: list[int] = []
    for members in sorted(groups.values(), key=lambda m: m[0]):
        if len(members) > 1 and len(picked) < requests:
            picked += members
    picked = sorted(picked)[:requests]
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in picked:
        row = rows[i]
        assert row.hash_ids is not None
        t += rng.expovariate(rate)
        blocks = row.hash_ids[:MAX_BLOCKS]
        out.append(Scaled(t, blocks, max(1, min(max_output, row.output_length))))
    return out


def block_text(block: int, tokens: int) -> str:
    """`tokens` tokens (about two letters each in the test model's vocabulary) of text
    that only this block id produces."""
    rng = random.Random(block * 7919 + 17)
    words = []
    for _ in range(max(1, tokens // 3)):
        words.append("".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 7))))
    return f"[{block}] " + " ".join(words)


def to_request(item: Scaled, block_tokens: int) -> LLMRequest:
    system = block_text(item.blocks[0], block_tokens)
    user = "\n".join(block_text(b, block_tokens) for b in item.blocks[1:])
    return LLMRequest(
        model="bench",
        messages=[Message(role="system", content=system), Message(role="user", content=user)],
        max_tokens=item.output,
        temperature=0.0,
        stream=True,
    )


@dataclass
class Outcome:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int


async def replay_real(
    trace: Sequence[Scaled], urls: Sequence[str], policy: str, block_tokens: int
) -> list[Outcome]:
    replicas = [
        LlamaCppBackend(
            u,
            MODEL_ALIAS,
            dialect_options={"manage_slots": False, "extra_body": {"ignore_eos": True}},
        )
        for u in urls
    ]
    results: list[Outcome | None] = [None] * len(trace)
    async with ReplicaPool(replicas, policy=policy) as pool:
        begin = time.perf_counter()

        async def one(i: int) -> None:
            item = trace[i]
            await anyio.sleep(max(0.0, item.arrival_s - (time.perf_counter() - begin)))
            response = await pool.generate(to_request(item, block_tokens))
            usage = response.usage
            assert response.ttft_s is not None
            results[i] = Outcome(response.ttft_s, usage.prompt_tokens, usage.cached_prompt_tokens)

        async with anyio.create_task_group() as tg:
            for i in range(len(trace)):
                tg.start_soon(one, i)
    for r in replicas:
        await r.aclose()
    return [r for r in results if r is not None]


def replay_sim(
    trace: Sequence[Scaled],
    profile: Profile,
    policy: str,
    replicas: int,
    block_tokens: int,
    tokens_per_block: float,
) -> list[Outcome]:
    """The same requests on simulated engines; routing keys from the same request text."""
    overhead = profile.calibration.request_overhead_s if profile.calibration else 0.0
    clock = VirtualClock()
    engines = [Engine(profile, clock, name=f"sim-{i}") for i in range(replicas)]
    router = Router(make_routing_policy(policy, replicas), [e.name for e in engines])
    requests: list[SimRequest] = []
    per_block = max(1, round(tokens_per_block))

    def arrive(i: int) -> None:
        item = trace[i]
        features = RequestFeatures.from_request(to_request(item, block_tokens), now=clock.now())
        ticket = router.route(features)
        prompt = Prompt.from_segments([(("block", b), per_block) for b in item.blocks])

        def first(req: SimRequest) -> None:
            router.prefill_done(req.tag)

        def done(req: SimRequest) -> None:
            router.finish(req.tag, now=clock.now(), cached_tokens=req.cached_tokens)

        req = SimRequest(prompt, item.output, tag=ticket, on_first_token=first, on_finish=done)
        requests.append(req)
        engines[ticket.replica].submit(req)

    for i, item in enumerate(trace):
        clock.schedule(item.arrival_s + overhead, lambda i=i: arrive(i))  # type: ignore[misc]
    clock.run()
    return [
        Outcome((r.ttft or 0.0) + overhead, r.prompt_tokens, r.cached_tokens or 0) for r in requests
    ]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, float]:
    ttft = [o.ttft_s for o in outcomes]
    prompt = sum(o.prompt_tokens for o in outcomes)
    cached = sum(o.cached_tokens for o in outcomes)
    return {
        "cached_prompt_tokens": cached,
        "prompt_tokens": prompt,
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p90_s": percentile(ttft, 0.9),
        "ttft_p99_s": percentile(ttft, 0.99),
    }


def _median(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_llamacpp_dispatch(
    *,
    requests: int,
    reps: int,
    rate: float,
    block_tokens: int,
    max_output: int,
    profile_name: str,
    trace_path: Path,
    seed: int,
    echo: Callable[..., Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rows = load_mooncake(trace_path, limit=3000)
    trace = scale_trace(rows, requests=requests, rate=rate, max_output=max_output, seed=seed)
    profile = Profile.load(profile_name)
    measured: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
    tokens_per_block: list[float] = []
    with tempfile.TemporaryDirectory(prefix="treadle-bench-dispatch-") as tmp:
        model = write_tiny_gguf(Path(tmp) / "small.gguf", SMALL)
        for rep in range(reps):
            for policy in POLICIES:
                with LlamaServers.start(
                    3, model, Path(tmp) / f"r{rep}-{policy}", cache_ram_mib=256
                ) as servers:
                    outcomes = anyio.run(replay_real, trace, servers.urls, policy, block_tokens)
                summary = summarize(outcomes)
                measured[policy].append(summary)
                tokens_per_block.append(
                    summary["prompt_tokens"] / sum(len(t.blocks) for t in trace)
                )
                cached, p50 = summary["cached_prompt_tokens"], summary["ttft_p50_s"]
                echo(f"rep {rep + 1}/{reps} {policy:12s} cached {cached:7.0f}  p50 {p50:.3f} s")
    per_block = statistics.median(tokens_per_block)
    results: dict[str, Any] = {}
    for policy in POLICIES:
        predicted = summarize(replay_sim(trace, profile, policy, 3, block_tokens, per_block))
        results[policy] = {**_median(measured[policy]), "predicted": predicted}
    base = results["round_robin"]
    ratios: dict[str, Any] = {}
    for policy in POLICIES[1:]:
        r = results[policy]
        ratios[f"{policy}_vs_round_robin_cached_tokens"] = (
            r["cached_prompt_tokens"] / base["cached_prompt_tokens"]
            if base["cached_prompt_tokens"]
            else None
        )
        ratios[f"{policy}_vs_round_robin_ttft_p50"] = r["ttft_p50_s"] / base["ttft_p50_s"]
        p, pb = r["predicted"], base["predicted"]
        ratios[f"predicted_{policy}_vs_round_robin_cached_tokens"] = (
            p["cached_prompt_tokens"] / pb["cached_prompt_tokens"]
            if pb["cached_prompt_tokens"]
            else None
        )
        ratios[f"predicted_{policy}_vs_round_robin_ttft_p50"] = p["ttft_p50_s"] / pb["ttft_p50_s"]
    config = {
        "engine": "llamacpp",
        "servers": 3,
        "slots_per_server": 4,
        "model": f"treadle tiny {SMALL.layers}x{SMALL.hidden} (random weights)",
        "requests": len(trace),
        "reps": reps,
        "rate_per_s": rate,
        "block_tokens": block_tokens,
        "tokens_per_block_measured": per_block,
        "max_output": max_output,
        "profile": profile.name,
        "trace": str(trace_path),
    }
    return config, results, ratios
