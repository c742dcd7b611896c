"""Fitting a profile's efficiencies to a real engine's probe samples (`calibrate`'s fit).

The samples (`Sample`) are what `calibrate` measured; `fit_efficiency` and
`calibrated_profile` find the efficiencies of `Profile.step_time`'s roofline per kernel
(`mfu`, `attention_mfu`, `mbu`, `kv_mbu`, `attention_query_tile`) and the per-request
overhead the engine does not model, by least squares on relative errors (the method is in
`treadle.backends.sim.calibrate`'s docstring).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from treadle.backends.sim.profile import Calibration, Efficiency, Profile

Kind = Literal["prefill", "cached", "decode", "mix"]


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
