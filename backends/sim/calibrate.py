"""Calibrate the simulator against a real serving engine, then check it on a held-back mix.

`treadle sim calibrate --server URL --profile BASE` (or `--engine llamacpp`, which starts
its own llama.cpp servers) runs three kinds of probes over the OpenAI chat API, streaming,
with `ignore_eos` so every answer has the length asked for:

- **prefill**: one request at a time, prompts of growing length, one output token: the
  time to first token (TTFT) against the prompt's tokens (`usage.prompt_tokens`), the
  median of `reps` repetitions;
- **cache hit**: a prompt, then the same prompt with a short suffix: TTFT with the prefix
  served from the server's cache (`usage.prompt_tokens_details.cached_tokens`);
- **decode**: B requests at once, prompts of C tokens, long answers: the time per decode
  step while all B decode together (the window between the last first token and the first
  last token), for B up to the server's batch and C up to its context.

The base profile gives the hardware and the model (and the engine's limits); the fit
replaces its efficiencies: `step_overhead_s`, `mfu` and `mbu` (the roofline of
`Profile.step_time`), plus the per-request overhead the engine does not model (HTTP,
tokenising, the chat template), by least squares on relative errors: the four rates
(`mfu`, `attention_mfu`, `mbu`, `kv_mbu`) by a simplex search in log space from several
starts, the two additive constants, for each candidate, by weighted linear least squares.
Attention and KV reads get their own efficiencies because their kernels run well below
the GEMMs' and weight streaming's rates (several times on a CPU; on a GPU decode attention
is bound by paged KV reads).
Every fitted number's `sources` note says which server, when, and from how many probes.

**Validation** then replays a held-back mix — Poisson arrivals at half the rate the
server serves such requests one at a time (sent in parts between the probe passes, so a
machine whose speed drifts drifts under both), log-uniform prompt lengths, uniform answer
lengths, a third of the prompts behind one of three shared prefixes — on the server and
on the simulator (the engine in virtual time with the calibrated profile, the same
arrivals, prompts and answer lengths), and reports the mean absolute percentage error of
TTFT and of decode time (first to last token). Nothing here depends on the engine being
llama.cpp: the same command calibrates a profile for vLLM on a GPU.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio

from treadle.backends.base import LLMRequest, Message
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, EngineConfig, SimRequest
from treadle.backends.sim.profile import Calibration, Efficiency, Profile

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

    def __init__(self, backend: OpenAICompatBackend, *, seed: int = 0) -> None:
        self.backend = backend
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
        request = LLMRequest(
            model="probe",
            messages=[Message(role="user", content=text)],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        start = time.perf_counter()
        stamps: list[float] = [] if times is None else times
        usage = None
        async for chunk in self.backend.stream(request, extra_body={"ignore_eos": True}):
            if chunk.delta or chunk.tool_calls:
                stamps.append(time.perf_counter() - start)
            if chunk.usage is not None:
                usage = chunk.usage
        if usage is None or not stamps:
            raise RuntimeError(f"{self.backend.name} streamed no tokens or no usage")
        return Sample(
            kind="prefill",
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_prompt_tokens,
            output_tokens=usage.completion_tokens,
            ttft_s=stamps[0],
            decode_s=stamps[-1] - stamps[0],
        )


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


#: a probe's identity across passes: (kind, nominal length, batch)
ProbeKey = tuple[str, int, int]


async def probe_pass(probe: Probe, plan: ProbePlan) -> dict[ProbeKey, Sample]:
    """One pass of every probe of `plan` (module docstring)."""
    out: dict[ProbeKey, Sample] = {}
    for n in plan.prefill_lengths:
        sample = await probe.send(probe.text(n), 1)
        sample.kind = "prefill"
        out["prefill", n, 1] = sample
    for n in plan.cached_lengths:
        base = probe.text(n)
        await probe.send(base, 1)
        sample = await probe.send(base + " " + probe.text(32, unique=False), 1)
        sample.kind = "cached"
        out["cached", n, 1] = sample
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
    """The work of each engine step of a lone prefill, chunked as `Profile.prefill_time`."""
    budget = profile.engine.max_num_batched_tokens
    cached = min(max(0, cached), n - 1)
    steps, done = [], cached
    while done < n:
        c = min(budget, n - done)
        steps.append(_step(profile, c, c * done + c * (c + 1) / 2, done))
        done += c
    return steps


def _step(profile: Profile, tokens: float, attn_ctx: float, kv_read: float) -> Work:
    """As the engine's step time: compute (GEMMs + attention) against memory (the weights
    once, the KV read and written), with the stored sizes; the slopes carry the rates."""
    m = profile.model
    attention = 4.0 * m.layers * m.num_heads * m.head_dim * attn_ctx
    kv = profile.kv_storage_bytes_per_token * (kv_read + tokens)
    return 2.0 * m.params * tokens, attention, profile.weight_bytes, kv


def _time(steps: Sequence[Work], s: Slopes) -> float:
    a, c, b, d = s
    return sum(max(a * f + c * g, b * w + d * k) for f, g, w, k in steps)


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


def _solve(rows: Sequence[_Row], slopes: Slopes) -> tuple[float, float, float]:
    """For fixed slopes, the constants `(r, o) >= 0` that minimise the squared relative
    error; returns `(r, o, error)`."""
    g = [_time(row.steps, slopes) for row in rows]
    u = [1.0 if row.uses_r else 0.0 for row in rows]
    v = [float(len(row.steps)) for row in rows]
    w = [1.0 / row.target**2 for row in rows]
    y = [row.target - gi for row, gi in zip(rows, g, strict=True)]

    def fit(use_r: bool, use_o: bool) -> tuple[float, float]:
        suu = sum(wi * ui * ui for wi, ui in zip(w, u, strict=True)) if use_r else 0.0
        svv = sum(wi * vi * vi for wi, vi in zip(w, v, strict=True)) if use_o else 0.0
        suv = sum(wi * ui * vi for wi, ui, vi in zip(w, u, v, strict=True))
        suy = sum(wi * ui * yi for wi, ui, yi in zip(w, u, y, strict=True))
        svy = sum(wi * vi * yi for wi, vi, yi in zip(w, v, y, strict=True))
        if use_r and use_o:
            det = suu * svv - suv * suv
            if abs(det) > 1e-30:
                return (svv * suy - suv * svy) / det, (suu * svy - suv * suy) / det
        if use_r and suu > 0:
            return suy / suu, 0.0
        if use_o and svv > 0:
            return 0.0, svy / svv
        return 0.0, 0.0

    best = (0.0, 0.0, math.inf)
    for use_r, use_o in ((True, True), (True, False), (False, True), (False, False)):
        r, o = fit(use_r, use_o)
        if r < 0 or o < 0:
            continue
        err = sum(
            wi * (r * ui + o * vi - yi) ** 2 for wi, ui, vi, yi in zip(w, u, v, y, strict=True)
        )
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


def fit_efficiency(profile: Profile, samples: Sequence[Sample]) -> dict[str, float]:
    """Fit `step_overhead_s`, `mfu`, `attention_mfu`, `mbu`, `kv_mbu` and the request
    overhead to the probes (module docstring)."""
    rows = _rows(profile, samples)
    if len(rows) < 6:
        raise ValueError("too few probes to fit (need at least 6)")
    peak = profile.gpu.peak_flops * profile.gpu.count
    bandwidth = profile.gpu.hbm_bandwidth * profile.gpu.count
    floor = (1.0 / peak, 1.0 / peak, 1.0 / bandwidth, 1.0 / bandwidth)

    def slopes(x: Sequence[float]) -> Slopes:
        a, c, b, d = (max(math.exp(v), lo) for v, lo in zip(x, floor, strict=True))
        return a, c, b, d

    def error(x: list[float]) -> float:
        return _solve(rows, slopes(x))[2]

    # starting points: each rate alone explaining the probes, then spread around them
    a0 = statistics.median(r.target / sum(s[0] for s in r.steps) for r in rows if r.uses_r)
    b0 = statistics.median(r.target / sum(s[2] for s in r.steps) for r in rows)
    d0 = statistics.median(r.target / max(1.0, sum(s[3] for s in r.steps)) for r in rows)
    base = [math.log(a0), math.log(a0), math.log(b0), math.log(d0)]
    best_x, best_err = base, error(base)
    for shift in ((0, 0, 0, 0), (0, 2, -2, -2), (-1, 1, -3, 0), (0, 3, -3, -3), (1, 0, -1, -4)):
        start = [v + s for v, s in zip(base, shift, strict=True)]
        x, err = _nelder_mead(error, start, step=1.5, iterations=400)
        if err < best_err:
            best_x, best_err = x, err
    s = slopes(best_x)
    r, o, _ = _solve(rows, s)
    predicted = [r * row.uses_r + o * len(row.steps) + _time(row.steps, s) for row in rows]
    mape = statistics.mean(
        abs(p - row.target) / row.target for p, row in zip(predicted, rows, strict=True)
    )
    a, c, b, d = s
    return {
        "mfu": min(1.0, 1.0 / (a * peak)),
        "attention_mfu": min(1.0, 1.0 / (c * peak)),
        "mbu": min(1.0, 1.0 / (b * bandwidth)),
        "kv_mbu": min(1.0, 1.0 / (d * bandwidth)),
        "step_overhead_s": o,
        "request_overhead_s": r,
        "fit_mape": mape,
    }


def calibrated_profile(
    base: Profile, fit: dict[str, float], *, server: str, served_model: str, samples: int
) -> Profile:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    note = (
        f"fitted by `treadle sim calibrate` against {server} ({served_model}) on {when}, "
        f"{samples} probes, mean |error| {fit['fit_mape']:.1%}"
    )
    sources = dict(base.sources)
    for key in ("mfu", "attention_mfu", "mbu", "kv_mbu", "step_overhead_s"):
        sources[f"efficiency.{key}"] = note
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
    probe = Probe(backend, seed=seed)
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
    say(f"held-back mix: {spec.requests} requests at {rate:.2f}/s in {parts_n} part(s)")
    parts: list[list[Sample]] = []
    for i in range(parts_n):
        # each part its own prefixes: the simulator replays every part from a cold cache
        prefixes = [probe.text(spec.prefix_tokens) for _ in range(spec.prefixes)]
        part = MixSpec(
            **{
                **asdict(spec),
                "requests": spec.requests // parts_n,
                "rate": rate,
                "seed": seed + 1 + i,
            }
        )
        parts.append(await run_mix(probe, part, prefixes))
        passes.append(await probe_pass(probe, plan))
    samples = merge_passes(passes)
    say(f"{len(samples)} probes ({len(passes)} passes); fitting")
    fit = fit_efficiency(base, samples)
    profile = calibrated_profile(
        base, fit, server=backend.root_url, served_model=backend.model, samples=len(samples)
    )
    validation = validate(profile, parts, config or EngineConfig())
    validation["rate_per_s"] = rate
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
        samples=[*samples, *(s for part in parts for s in part)],
        validation=validation,
        fit=fit,
        wall_s=time.perf_counter() - started,
    )


def _missing() -> Calibration:  # pragma: no cover - calibrated_profile always sets it
    raise AssertionError("a calibrated profile has its calibration record")
