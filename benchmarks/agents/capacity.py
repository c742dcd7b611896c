"""Capacity: the highest program arrival rate a system serves with mean JCT <= `slo` x the
programs' ideal while keeping up with the arrivals, measured on a rate grid with every seed
at every rate.

A run is finite: at a rate a system cannot sustain, its backlog grows only for as long as
programs arrive, and the mean JCT of a short run can stay under the bound while the
system falls further behind. So a rate also has to be *kept up with*: the programs
finished per minute (between the warm-up's end and the last arrival) must be at least
`keep_up` (0.9) of the rate. A rate's *load index* is
`max(mean slowdown / slo, keep_up x rate / throughput)`, of seed-averaged parts; the rate
passes while the index is at most 1.

JCT over ideal is not monotone in the rate on one seed (a burst of long programs can make
a lower rate look worse), so a search never bisects one seed. `SystemSearch` walks one
system up a geometric grid (`start x step^k`, the same grid for every system): at each
rate it runs all seeds and averages their slowdowns (mean JCT / mean ideal JCT of the
measured programs); while the index passes it goes up (several steps while the index is
far below 1), and when it misses it bisects the grid steps in between. At the first
rate that misses it, one more rate is run between the last pass and that miss (the
geometric midpoint, again with every seed), and the capacity is where the straight line
through the two nearest indexes crosses 1. A system that misses at the grid's
first rate is walked down instead; one that still meets the SLO at `max_steps` reports
that rate as a lower bound (`capped`).

The searches only say which (rate, seed) points they need next (`wanted`) and take their
results (`add`), so `bench.py` can run the points of every system at once on a process
pool.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from treadle.benchmarks.agents.sim import PointResult


@dataclass(frozen=True)
class Grid:
    start_per_min: float
    step: float = 1.25

    def __post_init__(self) -> None:
        if self.start_per_min <= 0 or self.step <= 1:
            raise ValueError("a grid needs start_per_min > 0 and step > 1")

    def rate(self, k: float) -> float:
        return self.start_per_min * self.step**k


@dataclass
class RatePoint:
    """Every seed's result at one rate."""

    rate_per_min: float
    results: dict[int, PointResult] = field(default_factory=dict)

    @property
    def slowdown(self) -> float:
        return statistics.fmean(r.slowdown for r in self.results.values())

    @property
    def throughput_per_min(self) -> float:
        return statistics.fmean(r.throughput_per_min for r in self.results.values())

    def index(self, slo: float, keep_up: float) -> float:
        """The load index (module docstring): at most 1 passes."""
        behind = keep_up * self.rate_per_min / max(self.throughput_per_min, 1e-9)
        return max(self.slowdown / slo, behind)


@dataclass
class SystemSearch:
    """One system's walk up the grid (module docstring)."""

    system: str
    grid: Grid
    seeds: tuple[int, ...]
    slo: float = 2.0
    keep_up: float = 0.9
    max_steps: int = 24
    max_leap: int = 3
    points: dict[float, RatePoint] = field(default_factory=dict)
    #: grid positions (k, possibly a half step) in the order they were run
    path: list[float] = field(default_factory=list)
    done: bool = False
    capped: bool = False
    _k: float = 0.0
    _pass_k: float | None = None
    _fail_k: float | None = None
    _refined: bool = False

    def __post_init__(self) -> None:
        self._open(0.0)

    def _open(self, k: float) -> None:
        self._k = k
        self.path.append(k)
        rate = self.grid.rate(k)
        self.points.setdefault(rate, RatePoint(rate))

    @property
    def current_rate(self) -> float:
        return self.grid.rate(self._k)

    def wanted(self) -> list[tuple[float, int]]:
        """(rate, seed) points this search needs now (empty when done or waiting)."""
        if self.done:
            return []
        rate = self.current_rate
        have = self.points[rate].results
        return [(rate, s) for s in self.seeds if s not in have]

    def add(self, result: PointResult) -> None:
        point = self.points.setdefault(result.rate_per_min, RatePoint(result.rate_per_min))
        point.results[result.seed] = result
        if result.rate_per_min != self.current_rate or len(point.results) < len(self.seeds):
            return
        self._advance(point.index(self.slo, self.keep_up))

    def _leap(self, index: float) -> int:
        """Grid steps to the next rate while bracketing: one, or more when the index is
        far from 1 (the index grows about in proportion to the rate past capacity), at
        most `max_leap`."""
        if index <= 0 or not math.isfinite(index):
            return 1
        steps = abs(math.log(index)) / math.log(self.grid.step)
        return max(1, min(self.max_leap, int(steps)))

    def _advance(self, index: float) -> None:
        ok = index <= 1.0
        k = self._k
        if ok:
            self._pass_k = k if self._pass_k is None else max(self._pass_k, k)
        else:
            self._fail_k = k if self._fail_k is None else min(self._fail_k, k)
        lo, hi = self._pass_k, self._fail_k
        if hi is None:  # still climbing
            if k + 1 > self.max_steps:
                self.done = self.capped = True
            else:
                self._open(k + self._leap(index))
            return
        if lo is None:  # missed at the bottom: walk down
            if k - 1 < -self.max_steps:
                self.done = True
            else:
                self._open(k - self._leap(index))
            return
        if hi - lo > 1:  # a leap overshot: bisect the grid steps between
            self._open(float(math.floor((lo + hi) / 2)))
            return
        if not self._refined and hi - lo > 0.5:
            self._refined = True
            self._open((lo + hi) / 2)
            return
        self.done = True

    def capacity(self) -> float:
        """Rate (programs/min) where the load index crosses 1."""
        if self._pass_k is None:
            return math.nan
        lo = self.points[self.grid.rate(self._pass_k)]
        if self._fail_k is None:
            return lo.rate_per_min
        hi = self.points[self.grid.rate(self._fail_k)]
        i_lo, i_hi = lo.index(self.slo, self.keep_up), hi.index(self.slo, self.keep_up)
        return interpolate(lo.rate_per_min, i_lo, hi.rate_per_min, i_hi, 1.0)

    def throughput_at(self, rate: float) -> float:
        """Seed-averaged throughput at `rate`, interpolated between the grid rates around it."""
        pts = self._complete()
        if not pts:
            return math.nan
        below = [p for p in pts if p.rate_per_min <= rate]
        above = [p for p in pts if p.rate_per_min >= rate]
        if not below or not above:
            return (below or above)[-1 if below else 0].throughput_per_min
        a, b = below[-1], above[0]
        if a.rate_per_min == b.rate_per_min:
            return a.throughput_per_min
        f = (rate - a.rate_per_min) / (b.rate_per_min - a.rate_per_min)
        return a.throughput_per_min + f * (b.throughput_per_min - a.throughput_per_min)

    def table(self) -> list[tuple[float, float, float]]:
        """(rate, seed-averaged slowdown, throughput) of every complete rate, by rate."""
        return [(p.rate_per_min, p.slowdown, p.throughput_per_min) for p in self._complete()]

    def _complete(self) -> list[RatePoint]:
        done = [p for p in self.points.values() if len(p.results) == len(self.seeds)]
        return sorted(done, key=lambda p: p.rate_per_min)


def interpolate(r0: float, s0: float, r1: float, s1: float, target: float) -> float:
    """Where the line through (r0, s0) and (r1, s1) reaches `target` (r0 if flat)."""
    if s1 == s0:
        return r0
    return r0 + (target - s0) * (r1 - r0) / (s1 - s0)
