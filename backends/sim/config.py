"""Engine switches (`EngineConfig`), gauges (`EngineMetrics`) and step reports (`StepInfo`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: the order in which waiting requests are admitted (vLLM's `--scheduling-policy`, plus
#: Continuum's "program"; `waiting.py` says how each orders them)
SchedulingPolicy = Literal["fcfs", "priority", "program"]
PinPressure = Literal["keep", "release", "last_resort"]
PinRelease = Literal["scheduled", "finished"]
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = ("fcfs", "priority", "program")
PIN_PRESSURES: tuple[PinPressure, ...] = ("keep", "release", "last_resort")
PIN_RELEASES: tuple[PinRelease, ...] = ("scheduled", "finished")


@dataclass(frozen=True)
class EngineConfig:
    """Switches of one engine; `None` limits come from the profile."""

    policy: SchedulingPolicy = "fcfs"
    pin_pressure: PinPressure = "keep"
    pin_release: PinRelease = "scheduled"
    max_pinned_fraction: float = 0.5
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_capacity_blocks: int | None = None
    #: most decode steps one event may cover (None: up to the next completion)
    max_jump_steps: int | None = None
    keep_finished: bool = False

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; use one of {SCHEDULING_POLICIES}")
        if self.pin_pressure not in PIN_PRESSURES:
            raise ValueError(f"pin_pressure must be one of {PIN_PRESSURES}")
        if self.pin_release not in PIN_RELEASES:
            raise ValueError(f"pin_release must be one of {PIN_RELEASES}")
        if not 0.0 <= self.max_pinned_fraction <= 1.0:
            raise ValueError("max_pinned_fraction must be in [0, 1]")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_capacity_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_jump_steps is not None and self.max_jump_steps < 1:
            raise ValueError("max_jump_steps must be >= 1")


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of one engine's gauges and counters (token counts in tokens)."""

    name: str
    time: float
    running: int
    waiting: int
    kv_usage: float
    kv_capacity_blocks: int
    pinned_blocks: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    pins_active: int
    pins_set: int
    pins_released: int
    pins_expired: int
    pins_refused: int
    preemptions: int
    recomputed_tokens: int
    prompt_tokens: int
    generation_tokens: int
    submitted: int
    finished: int
    aborted: int
    steps: int
    busy_s: float
    evicted_blocks: int

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hits_tokens / self.prefix_queries_tokens
            if self.prefix_queries_tokens
            else 0.0
        )


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One launched step, or a run of `steps` identical decode steps (for observers)."""

    start: float
    end: float
    steps: int
    decode_requests: int
    prefill_tokens: int
    prefill_requests: int
