"""The scheduling policy's knobs (`SchedulerConfig`), checked when made."""

from __future__ import annotations

from dataclasses import dataclass, field

from treadle.runtime.sched.limits import LimitConfig
from treadle.runtime.sched.residency import ResidencyConfig

__all__ = ["SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the scheduling policy (`treadle.runtime.sched.scheduler`'s docstring)."""

    #: attained service (GPU seconds) that ends level 0; each further level doubles it
    las_quantum_s: float = 2.0
    las_levels: int = 16
    #: a call (or a program waiting for admission) this long goes first
    starvation_s: float = 60.0
    #: lanes without a KV budget: admit new runs while queued calls of admitted runs
    #: <= this x the sum of lane limits
    backlog_factor: float = 1.0
    #: never more admitted, unfinished runs than this (None: no fixed cap)
    max_active_programs: int | None = None
    #: per-lane in-flight limits
    limits: LimitConfig = field(default_factory=LimitConfig)
    #: a call waiting this long on a full lane may be taken by an idle lane (homed calls)
    steal_after_s: float = 1.0
    #: KV residency (lanes with a budget)
    residency: ResidencyConfig = field(default_factory=ResidencyConfig)
    #: when the admission queue's head fits on no lane, at most this many programs behind
    #: it are tried on the other lanes (backfilling; 0: the head blocks everyone)
    backfill: int = 8

    def __post_init__(self) -> None:
        if self.las_quantum_s <= 0:
            raise ValueError("las_quantum_s must be > 0")
        if self.las_levels < 1:
            raise ValueError("las_levels must be >= 1")
        if self.starvation_s <= 0:
            raise ValueError("starvation_s must be > 0")
        if self.backlog_factor < 0:
            raise ValueError("backlog_factor must be >= 0")
        if self.max_active_programs is not None and self.max_active_programs < 1:
            raise ValueError("max_active_programs must be >= 1 or None")
        if self.backfill < 0:
            raise ValueError("backfill must be >= 0")
