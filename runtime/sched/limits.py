"""How many calls one lane (a replica or a backend) may have in flight: an AIMD limit.

The scheduler holds calls in its own queues so that the runtime, not the engine, decides
their order; it must still give each engine enough work to keep its batch full. The right
number depends on the prompts, the outputs and the memory they take, so it is learned the
way TCP learns a window: each finished call reports whether it met congestion (it queued
inside the engine, was preempted, or waited well beyond its own prefill) and

- without congestion, while the limit is what holds calls back (`in_flight` reached it),
  the limit grows by `increase` per `limit` calls (one per round trip: additive increase);
- with congestion it shrinks by the factor `decrease` (multiplicative decrease), at most
  once per `cooldown_s` so one burst of late answers counts once.

Signals come from the caller: real runs use the backend's measured time to first token
against a learned baseline (`TTFTSignal`) or the server's waiting count. A lane with a KV
budget needs no adaptive limit (admission by KV working set keeps its batch in memory):
its limit can stay at the engine's seats, as the agents benchmark's `treadle` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LimitConfig:
    initial: float = 16.0
    minimum: float = 1.0
    maximum: float = 512.0
    increase: float = 1.0
    decrease: float = 0.8
    cooldown_s: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        if self.increase <= 0:
            raise ValueError("increase must be > 0")
        if not 0 < self.decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        if self.cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")


class AIMDLimit:
    """An additive-increase / multiplicative-decrease in-flight limit (module docstring)."""

    __slots__ = ("_hold_until", "config", "value")

    def __init__(self, config: LimitConfig | None = None) -> None:
        self.config = config or LimitConfig()
        self.value = float(self.config.initial)
        self._hold_until = -math.inf

    def observe(self, *, congested: bool, in_flight: int, now: float) -> None:
        """One finished call: `in_flight` counts it (the load it was sent under)."""
        cfg = self.config
        if congested:
            if now >= self._hold_until:
                self.value = max(cfg.minimum, self.value * cfg.decrease)
                self._hold_until = now + cfg.cooldown_s
            return
        if in_flight >= math.floor(self.value):
            self.value = min(cfg.maximum, self.value + cfg.increase / self.value)


class TTFTSignal:
    """Congestion from time to first token, for backends that report nothing else.

    The baseline is the smallest TTFT per prompt-length bucket (powers of two of tokens),
    slowly forgotten (`decay` per sample, towards the latest value) so that a baseline
    measured on a different day does not stick; a call is congested when its TTFT exceeds
    `tolerance` x its bucket's baseline plus `slack_s`."""

    def __init__(self, *, tolerance: float = 2.0, slack_s: float = 0.05, decay: float = 0.001):
        if tolerance < 1:
            raise ValueError("tolerance must be >= 1")
        self.tolerance = tolerance
        self.slack_s = slack_s
        self.decay = decay
        self._base: dict[int, float] = {}

    @staticmethod
    def bucket(prompt_tokens: int) -> int:
        return max(0, int(prompt_tokens).bit_length())

    def congested(self, ttft_s: float | None, prompt_tokens: int) -> bool | None:
        """Whether this TTFT shows congestion (None: no TTFT, no signal)."""
        if ttft_s is None or not math.isfinite(ttft_s) or ttft_s < 0:
            return None
        b = self.bucket(prompt_tokens)
        base = self._base.get(b)
        if base is None or ttft_s < base:
            self._base[b] = ttft_s
            return False
        self._base[b] = base + self.decay * (ttft_s - base)
        return ttft_s > self.tolerance * base + self.slack_s
