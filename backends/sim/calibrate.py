"""Calibrate the simulator against a real serving engine, then check it on a held-back mix.

`treadle sim calibrate --server URL --profile BASE` (or `--engine llamacpp`, which starts
its own llama.cpp servers) runs three kinds of probes over the OpenAI chat API, streaming,
with `ignore_eos` so every answer has the length asked for:

- **prefill**: one request at a time, prompts of growing length, one output token: the
  time to first token (TTFT) against the prompt's tokens (`usage.prompt_tokens`);
- **cache hit**: a prompt, then the same prompt with a short and (separately) a long
  suffix: TTFT with the prefix served from the server's cache
  (`usage.prompt_tokens_details.cached_tokens`) — a short suffix is bound by reading the
  cached KV, a long one by compute;
- **decode**: B requests at once, prompts of C tokens, long answers: the time per decode
  step while all B decode together (the window between the last first token and the first
  last token), for B up to the server's batch and C up to its context.

Every probe runs in `reps` passes and counts by its median time over them: the held-back
mix runs on the same machine, so the fit must describe its typical speed, not its best
(the minimum would fit an idle machine). The passes' spread is reported. The client does
as little as it can per streamed chunk (it shares the cores with a local server): a time
stamp and a pattern test on the raw line; only the usage chunk is parsed.

The base profile gives the hardware and the model (and the engine's limits); the fit
replaces its efficiencies: `step_overhead_s`, `mfu`, `attention_mfu`, `mbu`, `kv_mbu` and
`attention_query_tile` (the roofline per kernel of `Profile.step_time`), plus the
per-request overhead the engine does not model (HTTP,
tokenising, the chat template), by least squares on relative errors: the four rates
(`mfu`, `attention_mfu`, `mbu`, `kv_mbu`) by a simplex search in log space from several
starts, the two additive constants, for each candidate, by weighted linear least squares;
the query tile by trying each of `QUERY_TILES` (a tile of T costs what compute-bound
attention at the KV rate / T costs for chunks of T tokens or more, so on a CPU the tile
is loosely determined while the predictions are not).
Attention and KV reads get their own efficiencies because their kernels run well below
the GEMMs' and weight streaming's rates (several times on a CPU; on a GPU decode attention
is bound by paged KV reads).
Every fitted number's `sources` note says which server, when, and from how many probes.

**Validation** then replays a held-back mix — Poisson arrivals at half the rate the
server serves such requests one at a time (sent in parts between the probe passes, so a
machine whose speed drifts drifts under both; each part `MixSpec.repeats` times, with the
same arrivals and lengths and fresh text), log-uniform prompt lengths, uniform answer
lengths, a third of the prompts behind one of three shared prefixes — on the server and
on the simulator (the engine in virtual time with the calibrated profile, the same
arrivals, prompts and answer lengths), and reports the mean absolute percentage error of
TTFT and of decode time (first to last token) against each request's median over the
replays, with each replay's own error and the replays' spread beside it. The fit never
sees the mix. Nothing here depends on the engine being
llama.cpp: the same command calibrates a profile for vLLM on a GPU.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio
import httpx

from treadle.backends.base import LLMRequest, Message
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, EngineConfig, SimRequest
from treadle.backends.sim.profile import Calibration, Efficiency, Profile
from treadle.errors import BackendError

Kind = Literal["prefill", "cached", "decode", "mix"]

_WORDS = (
    "agent tool cache prefix token batch decode prefill slot server replica queue latency "
    "throughput memory block schedule program workflow planner search answer context model "
    "request stream router engine kernel attention layer weight budget chunk window pin "
    "offload restore session priority tenant metric gauge counter trace span event journal"
).split()


@dataclass
class Sample:
    """One probe's measurement (times in seconds)."""

    kind: Kind
    prompt_tokens: int
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    #: first to last token (mix), or one decode step's time (decode probes)
    decode_s: float = 0.0
    batch: int = 1
    context: int = 0
    #: mix only: send time since the mix started, the shared prefix and its tokens
    start_s: float = 0.0
    prefix: int | None = None
    prefix_tokens: int = 0


@dataclass
class CalibrationReport:
    """What `calibrate` did: the fitted profile, every probe, the validation errors."""

    profile: Profile
    samples: list[Sample]
    validation: dict[str, Any]
    fit: dict[str, float]
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.model_dump(mode="json"),
            "fit": self.fit,
            "validation": self.validation,
            "samples": [asdict(s) for s in self.samples],
            "wall_s": round(self.wall_s, 2),
            "notes": self.notes,
        }


# -- probing ---------------------------------------------------------------------------------


class Probe:
    """Streams requests to one server and times their tokens."""

    def __init__(
        self, backend: OpenAICompatBackend, client: httpx.AsyncClient, *, seed: int = 0
    ) -> None:
        self.backend = backend
        self.client = client
        self.rng = random.Random(seed)
        self.tokens_per_word = 1.0
        self._serial = 0

    def text(self, tokens: int, *, unique: bool = True) -> str:
        """About `tokens` tokens of words; a unique head makes the prompt uncached."""
        words = max(1, round(tokens / self.tokens_per_word))
        self._serial += 1
        head = f"probe {self._serial} {self.rng.random():.12f}: " if unique else ""
        return head + " ".join(self.rng.choice(_WORDS) for _ in range(words))

    async def learn_tokenizer(self) -> None:
        words = 400
        sample = await self.send(" ".join(self.rng.choice(_WORDS) for _ in range(words)), 1)
        empty = await self.send("", 1)
        self.tokens_per_word = max(0.1, (sample.prompt_tokens - empty.prompt_tokens) / words)

    async def send(self, text: str, max_tokens: int, *, times: list[float] | None = None) -> Sample:
        """Stream one chat request and time its tokens (`times`, when given, gets the time
        of every chunk that carries output, from the send).

        The client shares the machine with the server it measures (on a small host, its
        cores): it does as little as it can per streamed chunk — a time stamp and a
        pattern search on the raw line; only the usage chunk is parsed."""
        request = LLMRequest(
            model="probe",
            messages=[Message(role="user", content=text)],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        body, headers = self.backend.build_request(
            request, stream=True, extra_body={"ignore_eos": True}
        )
        stamps: list[float] = [] if times is None else times
        usage: dict[str, Any] | None = None
        start = time.perf_counter()
        async with self.client.stream(
            "POST", self.backend.api_base + "/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise BackendError(
                    f"{self.backend.name} answered HTTP {response.status_code}: "
                    f"{response.text[:300]}"
                )
            async for line in response.aiter_lines():
                if carries_output(line):
                    stamps.append(time.perf_counter() - start)
                if _USAGE.search(line):
                    usage = json.loads(line.removeprefix("data:"))["usage"]
        if usage is None or not stamps:
            raise BackendError(f"{self.backend.name} streamed no tokens or no usage")
        details = usage.get("prompt_tokens_details") or {}
        return Sample(
            kind="prefill",
            prompt_tokens=int(usage["prompt_tokens"]),
            cached_tokens=int(details.get("cached_tokens") or 0),
            output_tokens=int(usage["completion_tokens"]),
            ttft_s=stamps[0],
            decode_s=stamps[-1] - stamps[0],
        )


#: a streamed chunk that carries output: non-empty `content` or a tool call delta
_OUTPUT = re.compile(r'"(?:content":\s*"[^"]|tool_calls":\s*\[)')


def carries_output(line: str) -> bool:
    """Whether a raw server-sent-events line is a chunk with output (no JSON parsing)."""
    return _OUTPUT.search(line) is not None


#: the chunk with the token counts (`stream_options.include_usage`)
_USAGE = re.compile(r'"usage":\s*\{')


def _median_sample(samples: Sequence[Sample]) -> Sample:
    """The repetitions of one probe as one sample: the median time (a busy machine's
    stalls land on single repetitions), the median token counts."""
    first = samples[0]
    return Sample(
        kind=first.kind,
        prompt_tokens=round(statistics.median(s.prompt_tokens for s in samples)),
        cached_tokens=round(statistics.median(s.cached_tokens for s in samples)),
        output_tokens=first.output_tokens,
        ttft_s=statistics.median(s.ttft_s for s in samples),
        decode_s=statistics.median(s.decode_s for s in samples),
        batch=first.batch,
        context=round(statistics.median(s.context for s in samples)),
    )


#: a probe's identity across passes: (kind, nominal length, batch or cached suffix)
ProbeKey = tuple[str, int, int]


async def probe_pass(probe: Probe, plan: ProbePlan) -> dict[ProbeKey, Sample]:
    """One pass of every probe of `plan` (module docstring)."""
    out: dict[ProbeKey, Sample] = {}
    for n in plan.prefill_lengths:
        sample = await probe.send(probe.text(n), 1)
        sample.kind = "prefill"
        out["prefill", n, 1] = sample
    for n in plan.cached_lengths:
        for suffix in plan.cached_suffixes:
            base = probe.text(n)
            await probe.send(base, 1)
            sample = await probe.send(base + " " + probe.text(suffix, unique=False), 1)
            sample.kind = "cached"
            out["cached", n, suffix] = sample
    for c in plan.decode_contexts:
        for b in plan.decode_batches:
            step = await probe_decode_step(probe, b, c, plan.decode_output)
            if step is not None:
                out["decode", c, b] = step
    return out


async def probe_decode_step(probe: Probe, b: int, c: int, output: int) -> Sample | None:
    """The time of one decode step with `b` requests decoding together at context `c`
    (None when they never decoded together for long enough to tell)."""
    stamps: list[list[float]] = [[] for _ in range(b)]
    results: list[Sample] = []

    async def one(i: int) -> None:
        results.append(await probe.send(probe.text(c), output, times=stamps[i]))

    async with anyio.create_task_group() as tg:
        for i in range(b):
            tg.start_soon(one, i)
    begin = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    steps = sum(1 for t in stamps[0] if begin < t <= end)
    if steps < 8:
        return None
    prompt = statistics.mean(r.prompt_tokens for r in results)
    done_before = sum(1 for t in stamps[0] if t <= begin)
    return Sample(
        kind="decode",
        prompt_tokens=round(prompt),
        output_tokens=output,
        decode_s=(end - begin) / steps,
        batch=b,
        context=round(prompt + done_before + steps / 2),
    )


def merge_passes(passes: Sequence[dict[ProbeKey, Sample]]) -> list[Sample]:
    """Each probe's median over the passes that measured it."""
    keys = sorted({k for p in passes for k in p})
    return [_median_sample([p[k] for p in passes if k in p]) for k in keys]


def probe_spread(passes: Sequence[dict[ProbeKey, Sample]]) -> dict[str, float]:
    """How much the passes disagree: for each probe measured more than once, (slowest -
    fastest) / median of its time; the median and the largest over the probes."""
    spreads = []
    for key in {k for p in passes for k in p}:
        runs = [p[key] for p in passes if key in p]
        times = [r.decode_s if key[0] == "decode" else r.ttft_s for r in runs]
        mid = statistics.median(times)
        if len(times) > 1 and mid > 0:
            spreads.append((max(times) - min(times)) / mid)
    if not spreads:
        return {}
    return {"probe_spread_p50": statistics.median(spreads), "probe_spread_max": max(spreads)}


# -- the fit ---------------------------------------------------------------------------------


#: one engine step's work: (GEMM FLOPs, attention FLOPs, weight bytes, KV bytes)
Work = tuple[float, float, float, float]
#: seconds per GEMM FLOP, per attention FLOP, per weight byte, per KV byte
Slopes = tuple[float, float, float, float]


@dataclass
class _Row:
    """A sample's prediction: `r * uses_r + o * steps + sum(step times)`."""

    target: float
    uses_r: bool
    steps: list[Work]


def _prefill_steps(profile: Profile, n: int, cached: int) -> list[Work]:
    """The work of each engine step of a lone prefill, chunked as `Profile.prefill_time`
    (the KV each chunk reads by the profile's attention query tile)."""
    budget = profile.engine.max_num_batched_tokens
    cached = min(max(0, cached), n - 1)
    steps, done = [], cached
    while done < n:
        c = min(budget, n - done)
        steps.append(_step(profile, c, c * done + c * (c + 1) / 2, profile.kv_read_tokens(c, done)))
        done += c
    return steps


def _step(profile: Profile, tokens: float, attn_ctx: float, kv_read: float) -> Work:
    """As the engine's step time: the GEMMs (FLOPs against the weights, read once) and
    attention (FLOPs against the KV read and written), with the stored sizes; the slopes
    carry the rates."""
    m = profile.model
    attention = 4.0 * m.layers * m.num_heads * m.head_dim * attn_ctx
    kv = profile.kv_storage_bytes_per_token * (kv_read + tokens)
    return 2.0 * m.params * tokens, attention, profile.weight_bytes, kv


def _time(steps: Sequence[Work], s: Slopes) -> float:
    a, c, b, d = s
    return sum(max(a * f, b * w) + max(c * g, d * k) for f, g, w, k in steps)


def _rows(profile: Profile, samples: Sequence[Sample]) -> list[_Row]:
    rows = []
    for s in samples:
        if s.kind in ("prefill", "cached"):
            steps = _prefill_steps(profile, s.prompt_tokens, s.cached_tokens)
            rows.append(_Row(s.ttft_s, True, steps))
        elif s.kind == "decode":
            b, c = s.batch, s.context
            rows.append(_Row(s.decode_s, False, [_step(profile, b, b * (c + 1), b * c)]))
    return rows


class _System:
    """The probes' rows with what does not depend on the slopes computed once: `solve`
    runs for every point the simplex search tries."""

    def __init__(self, rows: Sequence[_Row]) -> None:
        self.rows = rows
        self.u = [1.0 if row.uses_r else 0.0 for row in rows]
        self.v = [float(len(row.steps)) for row in rows]
        self.w = [1.0 / row.target**2 for row in rows]
        w, u, v = self.w, self.u, self.v
        self.suu = sum(wi * ui * ui for wi, ui in zip(w, u, strict=True))
        self.svv = sum(wi * vi * vi for wi, vi in zip(w, v, strict=True))
        self.suv = sum(wi * ui * vi for wi, ui, vi in zip(w, u, v, strict=True))

    def solve(self, slopes: Slopes) -> tuple[float, float, float]:
        """For fixed slopes, the constants `(r, o) >= 0` that minimise the squared
        relative error; returns `(r, o, error)`."""
        w, u, v = self.w, self.u, self.v
        y = [row.target - _time(row.steps, slopes) for row in self.rows]
        suy = sum(wi * ui * yi for wi, ui, yi in zip(w, u, y, strict=True))
        svy = sum(wi * vi * yi for wi, vi, yi in zip(w, v, y, strict=True))
        syy = sum(wi * yi * yi for wi, yi in zip(w, y, strict=True))
        suu, svv, suv = self.suu, self.svv, self.suv
        candidates = [(0.0, 0.0)]
        if suu > 0:
            candidates.append((suy / suu, 0.0))
        if svv > 0:
            candidates.append((0.0, svy / svv))
        det = suu * svv - suv * suv
        if abs(det) > 1e-30:
            candidates.append(((svv * suy - suv * svy) / det, (suu * svy - suv * suy) / det))
        best = (0.0, 0.0, math.inf)
        for r, o in candidates:
            if r < 0 or o < 0:
                continue
            # sum of w * (r*u + o*v - y)^2, expanded
            err = r * r * suu + o * o * svv + 2 * r * o * suv - 2 * r * suy - 2 * o * svy + syy
            if err < best[2]:
                best = (r, o, err)
        return best


def _nelder_mead(
    f: Callable[[list[float]], float], start: list[float], step: float, iterations: int
) -> tuple[list[float], float]:
    """Minimise `f` from `start` (the textbook simplex method; `step` sizes the simplex)."""
    n = len(start)
    simplex = [list(start)] + [
        [x + (step if i == j else 0.0) for j, x in enumerate(start)] for i in range(n)
    ]
    values = [f(p) for p in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]

        def towards(
            t: float, centroid: list[float] = centroid, worst: list[float] = worst
        ) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, worst, strict=True)]

        reflected = towards(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = towards(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = towards(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best
                best = simplex[0]
                simplex = [best] + [
                    [b + 0.5 * (x - b) for b, x in zip(best, p, strict=True)] for p in simplex[1:]
                ]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    i = min(range(n + 1), key=values.__getitem__)
    return simplex[i], values[i]


#: attention query tiles the fit tries (None: a chunk reads its context once)
QUERY_TILES: tuple[int | None, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, None)


def with_query_tile(profile: Profile, tile: int | None) -> Profile:
    return profile.model_copy(
        update={"efficiency": profile.efficiency.model_copy(update={"attention_query_tile": tile})}
    )


def fit_efficiency(
    profile: Profile, samples: Sequence[Sample], tiles: Sequence[int | None] = QUERY_TILES
) -> dict[str, float]:
    """Fit `step_overhead_s`, `mfu`, `attention_mfu`, `mbu`, `kv_mbu`, the attention query
    tile (the best of `tiles`) and the request overhead to the probes (module docstring).
    In the result `attention_query_tile` is 0 for None (a chunk reads its context once).

    Every tile is tried from one start, the three best from all of them."""
    if len(samples) < 6:
        raise ValueError("too few probes to fit (need at least 6)")
    screened = sorted(
        (_fit_rates(with_query_tile(profile, t), samples, _STARTS[:1])[1], i)
        for i, t in enumerate(tiles)
    )
    best: tuple[float, dict[str, float]] | None = None
    for _, i in screened[:3]:
        fit, err = _fit_rates(with_query_tile(profile, tiles[i]), samples, _STARTS)
        if best is None or err < best[0]:
            best = (err, {**fit, "attention_query_tile": float(tiles[i] or 0)})
    assert best is not None
    return best[1]


#: where the simplex search starts, in log space around each rate alone explaining the
#: probes: (GEMM FLOPs, attention FLOPs, weight bytes, KV bytes)
_STARTS = ((0, 0, 0, 0), (0, 2, -2, -2), (-1, 1, -3, 0), (0, 3, -3, -3), (1, 0, -1, -4))


def _fit_rates(
    profile: Profile, samples: Sequence[Sample], starts: Sequence[tuple[int, ...]]
) -> tuple[dict[str, float], float]:
    """The rates and constants for the profile's attention query tile, and the fit's
    objective (the sum of squared relative errors)."""
    system = _System(_rows(profile, samples))
    rows = system.rows
    if len(rows) < 6:
        raise ValueError("too few probes to fit (need at least 6)")
    peak = profile.gpu.peak_flops * profile.gpu.count
    bandwidth = profile.gpu.hbm_bandwidth * profile.gpu.count
    floor = (1.0 / peak, 1.0 / peak, 1.0 / bandwidth, 1.0 / bandwidth)

    def slopes(x: Sequence[float]) -> Slopes:
        a, c, b, d = (max(math.exp(v), lo) for v, lo in zip(x, floor, strict=True))
        return a, c, b, d

    def error(x: list[float]) -> float:
        return system.solve(slopes(x))[2]

    a0 = statistics.median(r.target / sum(s[0] for s in r.steps) for r in rows if r.uses_r)
    b0 = statistics.median(r.target / sum(s[2] for s in r.steps) for r in rows)
    d0 = statistics.median(r.target / max(1.0, sum(s[3] for s in r.steps)) for r in rows)
    base = [math.log(a0), math.log(a0), math.log(b0), math.log(d0)]
    best_x, best_err = base, error(base)
    for shift in starts:
        start = [v + s for v, s in zip(base, shift, strict=True)]
        x, err = _nelder_mead(error, start, step=1.5, iterations=400)
        if err < best_err:
            best_x, best_err = x, err
    s = slopes(best_x)
    r, o, _ = system.solve(s)
    predicted = [r * row.uses_r + o * len(row.steps) + _time(row.steps, s) for row in rows]
    mape = statistics.mean(
        abs(p - row.target) / row.target for p, row in zip(predicted, rows, strict=True)
    )
    a, c, b, d = s
    fit = {
        "mfu": min(1.0, 1.0 / (a * peak)),
        "attention_mfu": min(1.0, 1.0 / (c * peak)),
        "mbu": min(1.0, 1.0 / (b * bandwidth)),
        "kv_mbu": min(1.0, 1.0 / (d * bandwidth)),
        "step_overhead_s": o,
        "request_overhead_s": r,
        "fit_mape": mape,
    }
    return fit, best_err


def calibrated_profile(
    base: Profile, fit: dict[str, float], *, server: str, served_model: str, samples: int
) -> Profile:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    note = (
        f"fitted by `treadle sim calibrate` against {server} ({served_model}) on {when}, "
        f"{samples} probes, mean |error| {fit['fit_mape']:.1%}"
    )
    tile = round(fit.get("attention_query_tile", 0)) or None
    sources = dict(base.sources)
    for key in ("mfu", "attention_mfu", "mbu", "kv_mbu", "step_overhead_s"):
        sources[f"efficiency.{key}"] = note
    sources.pop("efficiency.attention_query_tile", None)
    if tile is not None:
        sources["efficiency.attention_query_tile"] = f"the best of {QUERY_TILES} " + note
    return base.model_copy(
        update={
            "name": f"{base.name}-calibrated",
            "description": f"{base.description} Efficiencies calibrated: {note}.",
            "efficiency": Efficiency(
                mfu=fit["mfu"],
                attention_mfu=fit["attention_mfu"],
                mbu=fit["mbu"],
                kv_mbu=fit["kv_mbu"],
                step_overhead_s=fit["step_overhead_s"],
                attention_query_tile=tile,
            ),
            "sources": sources,
            "calibration": Calibration(
                server=server,
                served_model=served_model,
                measured_at=when,
                samples=samples,
                request_overhead_s=fit["request_overhead_s"],
                fit_mape=fit["fit_mape"],
            ),
        }
    )


# -- validation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixSpec:
    """The held-back mix: `requests` requests at `rate` per second."""

    requests: int = 48
    rate: float = 4.0
    min_prompt: int = 64
    max_prompt: int = 3000
    min_output: int = 16
    max_output: int = 96
    prefixes: int = 3
    prefix_tokens: int = 600
    shared_fraction: float = 0.35
    seed: int = 1
    #: times each part is sent (the same arrivals and lengths, fresh text): the error is
    #: taken against each request's median, and reported for every replay as well
    repeats: int = 3


async def run_mix(probe: Probe, spec: MixSpec, prefixes: Sequence[str]) -> list[Sample]:
    """Send the mix at its arrival times; every request's TTFT and decode time. Requests
    that share a prefix take one of `prefixes` (about `spec.prefix_tokens` tokens each)."""
    rng = random.Random(spec.seed)
    plan: list[tuple[float, str, int, int | None, int]] = []
    t = 0.0
    for _ in range(spec.requests):
        t += rng.expovariate(spec.rate)
        n = round(math.exp(rng.uniform(math.log(spec.min_prompt), math.log(spec.max_prompt))))
        out = rng.randint(spec.min_output, spec.max_output)
        if rng.random() < spec.shared_fraction:
            k = rng.randrange(len(prefixes))
            text = prefixes[k] + " " + probe.text(max(16, n - spec.prefix_tokens))
            plan.append((t, text, out, k, spec.prefix_tokens))
        else:
            plan.append((t, probe.text(n), out, None, 0))
    results: list[Sample | None] = [None] * len(plan)
    begin = time.perf_counter()

    async def one(i: int) -> None:
        at, text, out, prefix, prefix_tokens = plan[i]
        await anyio.sleep(max(0.0, at - (time.perf_counter() - begin)))
        start = time.perf_counter() - begin
        sample = await probe.send(text, out)
        sample.kind, sample.start_s = "mix", start
        sample.prefix, sample.prefix_tokens = prefix, prefix_tokens
        results[i] = sample

    async with anyio.create_task_group() as tg:
        for i in range(len(plan)):
            tg.start_soon(one, i)
    return [s for s in results if s is not None]


def simulate_mix(
    profile: Profile, mix: Sequence[Sample], config: EngineConfig
) -> list[tuple[float, float]]:
    """(TTFT, decode time) of each mix request on the simulated engine, in virtual time.
    The request overhead of the calibration is added before the engine sees a request."""
    overhead = profile.calibration.request_overhead_s if profile.calibration else 0.0
    clock = VirtualClock()
    engine = Engine(profile, clock, config, name="calibration")
    requests = []
    for i, s in enumerate(mix):
        segments: list[tuple[object, int]] = []
        if s.prefix is not None:
            segments.append((("prefix", s.prefix), s.prefix_tokens))
        segments.append((("own", i), max(1, s.prompt_tokens - s.prefix_tokens)))
        req = SimRequest(Prompt.from_segments(segments), max(1, s.output_tokens), tag=i)
        engine.submit_at(s.start_s + overhead, req)
        requests.append(req)
    clock.run()
    out = []
    for s, req in zip(mix, requests, strict=True):
        assert req.first_token_time is not None and req.finish_time is not None
        out.append((req.first_token_time - s.start_s, req.finish_time - req.first_token_time))
    return out


def mape(pairs: Sequence[tuple[float, float]]) -> float:
    """Mean absolute percentage error of (predicted, measured) pairs with measured > 0."""
    usable = [(p, m) for p, m in pairs if m > 0]
    return statistics.mean(abs(p - m) / m for p, m in usable) if usable else math.nan


def merge_replays(replays: Sequence[Sequence[Sample]]) -> list[Sample]:
    """The replays of one part as one: each request's median time and token counts."""
    merged = []
    for same in zip(*replays, strict=True):
        first = same[0]
        merged.append(
            Sample(
                kind="mix",
                prompt_tokens=round(statistics.median(s.prompt_tokens for s in same)),
                cached_tokens=round(statistics.median(s.cached_tokens for s in same)),
                output_tokens=first.output_tokens,
                ttft_s=statistics.median(s.ttft_s for s in same),
                decode_s=statistics.median(s.decode_s for s in same),
                start_s=statistics.median(s.start_s for s in same),
                prefix=first.prefix,
                prefix_tokens=first.prefix_tokens,
            )
        )
    return merged


def replay_spread(replays: Sequence[Sequence[Sample]]) -> dict[str, float]:
    """How much replays of the same requests disagree: the median over requests of
    (slowest - fastest) / median, for TTFT and for decode time."""
    out: dict[str, float] = {}
    for name, get in (("ttft", lambda s: s.ttft_s), ("decode", lambda s: s.decode_s)):
        spreads = []
        for same in zip(*replays, strict=True):
            times = [get(s) for s in same]
            mid = statistics.median(times)
            if mid > 0 and len(times) > 1:
                spreads.append((max(times) - min(times)) / mid)
        if spreads:
            out[f"{name}_spread_p50"] = statistics.median(spreads)
    return out


def validate_replays(
    profile: Profile, replays: Sequence[Sequence[Sequence[Sample]]], config: EngineConfig
) -> dict[str, Any]:
    """`validate` on each part's per-request medians over its replays (`replays[part]
    [replay][request]`), with every replay's own errors and the replays' spread beside."""
    out = validate(profile, [merge_replays(part) for part in replays], config)
    n = min(len(part) for part in replays)
    each = [validate(profile, [part[i] for part in replays], config) for i in range(n)]
    out["ttft_mape_each_replay"] = [v["ttft_mape"] for v in each]
    out["decode_mape_each_replay"] = [v["decode_mape"] for v in each]
    out["replays"] = n
    for part in replays:
        for key, value in replay_spread(part).items():
            out.setdefault(key + "_parts", []).append(value)
    for key in ("ttft_spread_p50", "decode_spread_p50"):
        values = out.pop(key + "_parts", [])
        if values:
            out[key] = statistics.median(values)
    return out


def validate(
    profile: Profile, parts: Sequence[Sequence[Sample]], config: EngineConfig
) -> dict[str, Any]:
    """The simulator's errors on the held-back mix, sent in `parts` (each replayed on its
    own: probes ran on the server between them)."""
    mix = [s for part in parts for s in part]
    predicted = [p for part in parts for p in simulate_mix(profile, part, config)]
    ttft = [(p[0], s.ttft_s) for p, s in zip(predicted, mix, strict=True)]
    decode = [
        (p[1], s.decode_s) for p, s in zip(predicted, mix, strict=True) if s.output_tokens > 1
    ]
    return {
        "requests": len(mix),
        "ttft_mape": mape(ttft),
        "decode_mape": mape(decode),
        "ttft_p50_measured_s": statistics.median(m for _, m in ttft),
        "ttft_p50_predicted_s": statistics.median(p for p, _ in ttft),
        "decode_p50_measured_s": statistics.median(m for _, m in decode),
        "decode_p50_predicted_s": statistics.median(p for p, _ in decode),
        "cached_tokens_measured": sum(s.cached_tokens for s in mix),
    }


# -- the whole procedure ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProbePlan:
    prefill_lengths: tuple[int, ...] = (32, 128, 512, 1024, 2048, 3072, 4096)
    cached_lengths: tuple[int, ...] = (256, 1024, 4096)
    #: new tokens after each cached prefix: a short suffix can be bound by reading the
    #: cached KV, a long one by compute
    cached_suffixes: tuple[int, ...] = (32, 512)
    decode_batches: tuple[int, ...] = (1, 2, 4)
    decode_contexts: tuple[int, ...] = (64, 1024, 3072)
    decode_output: int = 160
    #: passes over every probe; the held-back mix is sent in `reps - 1` parts between them
    reps: int = 5


async def calibrate(
    backend: OpenAICompatBackend,
    base: Profile,
    *,
    plan: ProbePlan | None = None,
    mix: MixSpec | None = None,
    config: EngineConfig | None = None,
    seed: int = 0,
    echo: Any = None,
) -> CalibrationReport:
    """Probe `backend`'s server, fit `base`'s efficiencies, validate on a held-back mix.

    The probes run in `plan.reps` passes with the held-back mix sent in parts between
    them, so that a machine whose speed drifts (other work on it) drifts under both."""
    plan = plan or ProbePlan()
    spec = mix or MixSpec()
    say = echo or (lambda *_: None)
    started = time.perf_counter()
    # A fresh connection per request: servers close kept-alive connections on their own
    # terms (llama.cpp's after a few requests), and a request sent on one that is closing
    # fails; a loopback or LAN connect costs far less than the request overhead fitted.
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(backend.timeout_s, connect=10.0),
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        return await _calibrate(
            Probe(backend, client, seed=seed), base, plan, spec, config, seed, say, started
        )


async def _calibrate(
    probe: Probe,
    base: Profile,
    plan: ProbePlan,
    spec: MixSpec,
    config: EngineConfig | None,
    seed: int,
    say: Callable[..., Any],
    started: float,
) -> CalibrationReport:
    backend = probe.backend
    await probe.learn_tokenizer()
    say(f"tokenizer: {probe.tokens_per_word:.2f} tokens per probe word")
    passes = [await probe_pass(probe, plan)]
    # the mix's rate: about half the capacity a first fit predicts
    first = calibrated_profile(
        base, fit_efficiency(base, merge_passes(passes)), server="", served_model="", samples=1
    )
    service = first.prefill_time((spec.min_prompt + spec.max_prompt) // 2) + (
        (spec.min_output + spec.max_output) / 2
    ) * first.decode_step_time(1, spec.max_prompt // 2)
    # half of what the server serves one request at a time: batching adds capacity on a
    # GPU, little on a CPU, so this keeps either at most about half busy
    rate = min(spec.rate, 0.5 / max(service, 1e-6))
    parts_n = max(1, plan.reps - 1)
    repeats = max(1, spec.repeats)
    say(
        f"held-back mix: {spec.requests} requests at {rate:.2f}/s in {parts_n} part(s), "
        f"each sent {repeats} time(s)"
    )
    parts: list[list[list[Sample]]] = []
    for i in range(parts_n):
        part = MixSpec(
            **{
                **asdict(spec),
                "requests": spec.requests // parts_n,
                "rate": rate,
                "seed": seed + 1 + i,
            }
        )
        replays = []
        for _ in range(repeats):
            # each replay its own prefixes: the simulator replays it from a cold cache
            prefixes = [probe.text(spec.prefix_tokens) for _ in range(spec.prefixes)]
            replays.append(await run_mix(probe, part, prefixes))
        parts.append(replays)
        passes.append(await probe_pass(probe, plan))
    samples = merge_passes(passes)
    say(f"{len(samples)} probes ({len(passes)} passes); fitting")
    fit = fit_efficiency(base, samples)
    profile = calibrated_profile(
        base, fit, server=backend.root_url, served_model=backend.model, samples=len(samples)
    )
    validation = validate_replays(profile, parts, config or EngineConfig())
    validation["rate_per_s"] = rate
    validation.update(probe_spread(passes))
    profile = profile.model_copy(
        update={
            "calibration": (profile.calibration or _missing()).model_copy(
                update={
                    "validation_ttft_mape": validation["ttft_mape"],
                    "validation_decode_mape": validation["decode_mape"],
                }
            )
        }
    )
    return CalibrationReport(
        profile=profile,
        samples=[*samples, *(s for part in parts for replay in part for s in replay)],
        validation=validation,
        fit=fit,
        wall_s=time.perf_counter() - started,
    )


def _missing() -> Calibration:  # pragma: no cover - calibrated_profile always sets it
    raise AssertionError("a calibrated profile has its calibration record")
