"""KV pinning with time-to-live: how long each tool takes, and whether a call's KV is worth
keeping on the GPU while the tool runs.

Three pieces, all pure (no I/O, no clock of their own) so the benchmark drives them in
virtual time and the runtime in real time:

- `DurationEstimator` — one tool's duration distribution, online. It keeps the most
  recent `window` observations in sorted order (a sliding-window quantile sketch: a tool's
  speed drifts, e.g. a test suite grows, so old samples should age out) and mixes them
  with a *prior*: an exponential distribution whose mean is the tool's declared
  `expected_duration_s`, weighted like `prior_weight` observations. The prior gives a
  usable distribution before the first call and fades as real calls arrive. Quantiles of
  the mixture are found by bisection on its CDF (O(log window) per CDF evaluation).
- `ToolDurations` — the estimators of every tool, fed by `Tool.add_observer` with every
  call's measured duration.
- `PinPolicy` — the decision for a finishing call: pin its KV with
  `ttl = q-quantile of the next tool's duration` for the `q` that maximises
  `expected saving - expected cost`, and only when that is positive, where
      saving(ttl) = prefill time of the context tokens x P(tool returns within ttl)
      cost(ttl)   = (KV tokens / KV capacity) x E[min(duration, ttl)] x price(pressure)
  `price` turns "this share of GPU memory held for this long" into GPU-seconds: nothing
  when memory is idle, one replica-second per (whole memory x second) at half pressure,
  and steeply more as memory fills (`pressure / (1 - pressure)`). Never a pin after the
  program's last LLM step (known statically from the DAG).
- `PinBook` — the pins in force (one per program) and their early release: when the
  program's next call arrives (the engine then holds the blocks itself), when the run is
  cancelled or ends, or when memory pressure rises (`shed`). It reports every set and
  release to listeners, which the runtime turns into `PinSet` / `PinReleased` events.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from treadle.tools.base import Tool

#: duration assumed for a tool that declares none (graphs.analysis uses the same default)
DEFAULT_TOOL_S = 0.5
#: the quantiles a TTL may be taken from
DEFAULT_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)


class DurationEstimator:
    """Online estimate of one tool's duration distribution (see the module docstring)."""

    __slots__ = (
        "_recent",
        "_sorted",
        "_wsum",
        "count",
        "expected_s",
        "prior_weight",
        "window",
    )

    def __init__(
        self,
        expected_s: float | None = None,
        *,
        window: int = 1024,
        prior_weight: float = 8.0,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if prior_weight < 0:
            raise ValueError("prior_weight must be >= 0")
        if expected_s is not None and not (expected_s >= 0 and math.isfinite(expected_s)):
            raise ValueError("expected_s must be a finite number >= 0")
        self.expected_s = DEFAULT_TOOL_S if expected_s is None else float(expected_s)
        self.window = window
        self.prior_weight = float(prior_weight)
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._wsum = 0.0
        self.count = 0

    # -- updates -----------------------------------------------------------------------

    def observe(self, duration_s: float) -> None:
        """Record one call's duration (seconds; negative or non-finite values are errors)."""
        if not (duration_s >= 0 and math.isfinite(duration_s)):
            raise ValueError(f"a duration must be a finite number >= 0, got {duration_s!r}")
        d = float(duration_s)
        self.count += 1
        self._recent.append(d)
        self._wsum += d
        bisect.insort(self._sorted, d)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            self._wsum -= old
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    # -- the mixture -------------------------------------------------------------------

    def _prior_mass(self) -> float:
        """Weight of the prior in the mixture: `prior_weight` pseudo-observations."""
        w = self.prior_weight
        n = len(self._sorted)
        return w / (w + n) if w + n > 0 else 1.0

    def _prior_cdf(self, x: float) -> float:
        if x < 0:
            return 0.0
        if self.expected_s <= 0:  # declared instantaneous: a point mass at 0
            return 1.0
        if x == 0:
            return 0.0
        return 1.0 - math.exp(-x / self.expected_s)

    def cdf(self, x: float) -> float:
        """P(duration <= x)."""
        n = len(self._sorted)
        p = self._prior_mass()
        emp = bisect.bisect_right(self._sorted, x) / n if n else 0.0
        return p * self._prior_cdf(x) + (1.0 - p) * emp

    def quantile(self, q: float) -> float:
        """The q-quantile (0 < q < 1) of the duration distribution, exactly, in
        O(log² window): a binary search over the samples (where the empirical part of the
        CDF jumps; one CDF evaluation per step), then the prior's closed-form inverse
        between two samples."""
        if not 0.0 < q < 1.0:
            raise ValueError("q must be in (0, 1)")
        data = self._sorted
        n = len(data)
        p = self._prior_mass()
        # smallest i with F(data[i]) >= q (n when none)
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cdf(data[mid]) >= q:
                hi = mid
            else:
                lo = mid + 1
        i = lo
        if p <= 0.0:
            return data[i] if i < n else (data[-1] if n else 0.0)
        # on [data[i-1], data[i]) the empirical part is flat: solve the prior for the rest
        below = bisect.bisect_right(data, data[i - 1]) / n if i > 0 else 0.0
        g = (q - (1.0 - p) * below) / p
        x = self._prior_inverse(g)
        floor = data[i - 1] if i > 0 else 0.0
        x = max(x, floor)
        return min(x, data[i]) if i < n else x

    def _prior_inverse(self, g: float) -> float:
        if g <= 0.0 or self.expected_s <= 0:
            return 0.0
        if g >= 1.0:
            return math.inf
        return -self.expected_s * math.log1p(-g)

    def mean(self) -> float:
        p = self._prior_mass()
        n = len(self._sorted)
        emp = self._wsum / n if n else 0.0
        return p * self.expected_s + (1.0 - p) * emp

    def expected_min(self, t: float) -> float:
        """E[min(duration, t)]: how long a pin with TTL `t` is expected to be held."""
        if t <= 0:
            return 0.0
        p = self._prior_mass()
        m = self.expected_s
        prior = m * (1.0 - math.exp(-t / m)) if m > 0 else 0.0
        data = self._sorted
        n = len(data)
        if n:
            i = bisect.bisect_right(data, t)
            emp = (sum(data[:i]) + t * (n - i)) / n
        else:
            emp = 0.0
        return p * prior + (1.0 - p) * emp


class ToolDurations:
    """Per-tool duration estimators, updated from every tool call.

    `register(tool)` seeds the tool's estimator from its declared `expected_duration_s` and
    subscribes to its calls (`Tool.add_observer`); `observe(name, duration_s, ok)` is the
    observer and may be called directly (the benchmark does, in virtual time). A failed
    call's duration counts too: the program waited for it all the same.
    """

    def __init__(
        self,
        *,
        default_s: float = DEFAULT_TOOL_S,
        window: int = 1024,
        prior_weight: float = 8.0,
    ) -> None:
        self.default_s = default_s
        self.window = window
        self.prior_weight = prior_weight
        self._estimators: dict[str, DurationEstimator] = {}

    def declare(self, name: str, expected_s: float | None) -> DurationEstimator:
        """Seed `name`'s estimator with a declared expectation (keeps existing samples)."""
        est = self._estimators.get(name)
        seed = self.default_s if expected_s is None else expected_s
        if est is None:
            est = DurationEstimator(seed, window=self.window, prior_weight=self.prior_weight)
            self._estimators[name] = est
        else:
            est.expected_s = float(seed)
        return est

    def register(self, tool: Tool) -> None:
        """Seed from `tool.expected_duration_s` and observe every call of `tool`."""
        if tool.name not in self._estimators:
            self.declare(tool.name, tool.expected_duration_s)
        tool.add_observer(self.observe)

    def register_all(self, tools: Iterable[Tool]) -> None:
        for t in tools:
            self.register(t)

    def observe(self, name: str, duration_s: float, ok: bool = True) -> None:
        self.estimator(name).observe(duration_s)

    def estimator(self, name: str) -> DurationEstimator:
        est = self._estimators.get(name)
        if est is None:
            est = self.declare(name, None)
        return est


# -- the decision ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PinRequest:
    """What the policy needs to know about a finishing call."""

    #: KV tokens the pin would hold: the call's prompt plus its output
    tokens: int
    #: seconds to recompute those tokens if they are evicted (prefill time)
    prefill_s: float
    #: the replica's KV capacity in tokens
    capacity_tokens: int
    #: memory pressure on the replica, 0 (idle) .. 1 (full; >= 1 means over-subscribed)
    pressure: float
    #: the tool the program runs next (None: no tool follows, nothing to wait for)
    tool: str | None
    #: the program's last LLM step (static fact): never pin after it
    is_last_step: bool = False


@dataclass(frozen=True, slots=True)
class PinDecision:
    ttl_s: float | None
    quantile: float | None
    saving_s: float
    cost_s: float
    reason: str

    @property
    def pin(self) -> bool:
        return self.ttl_s is not None


def pressure_price(pressure: float, cap: float = 1e3) -> float:
    """GPU-seconds that holding all of a replica's memory for one second costs."""
    if pressure <= 0:
        return 0.0
    if pressure >= 1:
        return cap
    return min(cap, pressure / (1.0 - pressure))


class PinPolicy:
    """Decides TTL pins from tool-duration quantiles and a cost-benefit test."""

    def __init__(
        self,
        durations: ToolDurations,
        *,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        max_ttl_s: float = 300.0,
        min_tokens: int = 16,
    ) -> None:
        if not quantiles or any(not 0 < q < 1 for q in quantiles):
            raise ValueError("quantiles must be a non-empty list of values in (0, 1)")
        self.durations = durations
        self.quantiles = tuple(sorted(quantiles))
        self.max_ttl_s = max_ttl_s
        self.min_tokens = min_tokens
        self._tables: dict[str, tuple[int, list[tuple[float, float, float, float]]]] = {}

    def _table(self, tool: str) -> list[tuple[float, float, float, float]]:
        """(q, ttl, P(done within ttl), E[min(duration, ttl)]) per quantile, recomputed
        when the tool's estimate has taken in ~3 % more observations since (decisions are
        then O(quantiles); one more sample among hundreds does not move a quantile)."""
        est = self.durations.estimator(tool)
        version = est.count
        cached = self._tables.get(tool)
        if cached is not None and version - cached[0] <= cached[0] // 32:
            return cached[1]
        rows = []
        for q in self.quantiles:
            ttl = min(self.max_ttl_s, est.quantile(q))
            if ttl > 0:
                rows.append((q, ttl, est.cdf(ttl), est.expected_min(ttl)))
        self._tables[tool] = (version, rows)
        return rows

    def decide(self, req: PinRequest) -> PinDecision:
        if req.is_last_step:
            return PinDecision(None, None, 0.0, 0.0, "last LLM step")
        if req.tool is None:
            return PinDecision(None, None, 0.0, 0.0, "no tool follows")
        if req.tokens < self.min_tokens or req.capacity_tokens <= 0:
            return PinDecision(None, None, 0.0, 0.0, "nothing worth holding")
        table = self._table(req.tool)
        share = req.tokens / req.capacity_tokens
        price = pressure_price(req.pressure)
        best: PinDecision | None = None
        for q, ttl, p_done, hold in table:
            saving = req.prefill_s * p_done
            cost = share * hold * price
            if best is None or saving - cost > best.saving_s - best.cost_s:
                best = PinDecision(ttl, q, saving, cost, "saving exceeds cost")
        if best is None or best.saving_s <= best.cost_s:
            saving = best.saving_s if best else 0.0
            cost = best.cost_s if best else 0.0
            return PinDecision(None, None, saving, cost, "cost exceeds saving")
        return best


# -- pins in force -----------------------------------------------------------------------


@dataclass(slots=True)
class Pin:
    """One pin in force: a program's KV held on `lane` until `deadline`."""

    program_id: str
    call_id: str
    node: str
    lane: int
    tokens: int
    ttl_s: float
    set_at: float
    deadline: float
    #: expected recompute saved if the pin is used (for shedding the least valuable first)
    saving_s: float = 0.0


PinListener = Callable[[str, Pin, str, bool], None]
"""Called as `listener(kind, pin, reason, used)` with kind "set" or "released"."""


@dataclass
class PinBook:
    """The pins in force, at most one per program (a new pin replaces the old one)."""

    listeners: list[PinListener] = field(default_factory=list)
    _pins: dict[str, Pin] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, program_id: str) -> Pin | None:
        return self._pins.get(program_id)

    def pinned_tokens(self, lane: int | None = None) -> int:
        return sum(p.tokens for p in self._pins.values() if lane is None or p.lane == lane)

    def set(self, pin: Pin) -> None:
        old = self._pins.get(pin.program_id)
        if old is not None:
            self._release(old, "replaced", used=False)
        self._pins[pin.program_id] = pin
        self._notify("set", pin, "", False)

    def on_next_call(self, program_id: str, now: float) -> Pin | None:
        """The program's next call arrived: its pin has done its job (if still in time)."""
        pin = self._pins.get(program_id)
        if pin is None:
            return None
        used = now <= pin.deadline
        self._release(pin, "next_call" if used else "expired", used=used)
        return pin

    def cancel(self, program_id: str, reason: str = "cancelled") -> Pin | None:
        pin = self._pins.get(program_id)
        if pin is not None:
            self._release(pin, reason, used=False)
        return pin

    def expire(self, now: float) -> list[Pin]:
        """Release pins past their deadline (the engine has dropped them already)."""
        gone = [p for p in self._pins.values() if p.deadline < now]
        for p in gone:
            self._release(p, "expired", used=False)
        return gone

    def shed(self, lane: int, tokens_needed: int, now: float) -> list[Pin]:
        """Release pins on `lane` until `tokens_needed` tokens are freed, least valuable
        first: lowest expected saving per token still to be held."""
        candidates = [p for p in self._pins.values() if p.lane == lane and p.deadline >= now]
        candidates.sort(key=lambda p: (p.saving_s / max(1, p.tokens), p.deadline))
        freed = 0
        out: list[Pin] = []
        for p in candidates:
            if freed >= tokens_needed:
                break
            self._release(p, "pressure", used=False)
            freed += p.tokens
            out.append(p)
        return out

    def _release(self, pin: Pin, reason: str, *, used: bool) -> None:
        if self._pins.get(pin.program_id) is pin:
            del self._pins[pin.program_id]
        self.released[reason] = self.released.get(reason, 0) + 1
        self._notify("released", pin, reason, used)

    def _notify(self, kind: str, pin: Pin, reason: str, used: bool) -> None:
        for listener in list(self.listeners):
            listener(kind, pin, reason, used)
