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
from typing import Any

import anyio
import httpx

from treadle.backends.base import LLMRequest, Message
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.calibration_fit import Sample, calibrated_profile, fit_efficiency
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, EngineConfig, SimRequest
from treadle.backends.sim.profile import Calibration, Profile
from treadle.errors import BackendError

_WORDS = (
    "agent tool cache prefix token batch decode prefill slot server replica queue latency "
    "throughput memory block schedule program workflow planner search answer context model "
    "request stream router engine kernel attention layer weight budget chunk window pin "
    "offload restore session priority tenant metric gauge counter trace span event journal"
).split()


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
