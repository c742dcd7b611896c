"""What a run of `treadle bench agents` is made of: the cluster, where the programs come
from (a generator or a trace, loaded once per process and seed), the run's settings, and
its outcome (the searches and the reference-load and overload points)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from treadle.backends.sim import Profile
from treadle.benchmarks.agents.capacity import Grid, SystemSearch
from treadle.benchmarks.agents.copilot import trace_workload
from treadle.benchmarks.agents.sim import PointResult, ideal_times
from treadle.benchmarks.agents.workloads import Workload, make_workload


@dataclass(frozen=True)
class ClusterSpec:
    """The simulated cluster every system runs on."""

    replicas: int
    profile: str
    #: KV capacity per replica in tokens (None: the profile's)
    kv_tokens: int | None = None


@dataclass(frozen=True)
class Source:
    """Where a run's programs come from: a generator (`workload`) or a trace file."""

    workload: str
    programs: int
    trace: str | None = None

    def load(self, seed: int) -> Workload:
        return _load(self, seed)


@functools.cache
def _load(source: Source, seed: int) -> Workload:
    if source.trace is not None:
        return trace_workload(source.trace, source.programs, seed)
    return make_workload(source.workload, source.programs, seed)


@functools.cache
def cached_ideal(source: Source, seed: int, profile: str) -> dict[int, float]:
    return ideal_times(source.load(seed), Profile.load(profile))


@dataclass
class BenchSpec:
    source: Source
    cluster: ClusterSpec
    systems: list[str]
    seeds: tuple[int, ...]
    slo_factor: float = 2.0
    grid_step: float = 1.25
    #: grid start in programs/min (None: from the workload, see GRID_START)
    grid_start: float | None = None
    workers: int = 1


@dataclass
class BenchOutcome:
    spec: BenchSpec
    grid: Grid
    searches: dict[str, SystemSearch]
    reference_per_min: float
    at_ref: dict[str, list[PointResult]] = field(default_factory=dict)
    overload: dict[str, list[PointResult]] = field(default_factory=dict)
    ideal_mean_s: float = math.nan
    wall_s: float = 0.0
