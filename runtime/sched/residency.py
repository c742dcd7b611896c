"""KV residency: which programs hold KV on which lane, where a newcomer goes, and whom to
suspend when the residents outgrow a lane.

A program is *resident* on a lane while it holds a reservation of its working set there
(`Program.kv_tokens`: the context its next call sends plus the output it generates, as
the caller measures it). Residents run without being thrashed: a lane admits a program
only while `reserved + need <= admit_fraction x budget`, so the programs already there
keep their caches, and a program that is not admitted holds nothing at all (it waits in
the scheduler's admission queue, not in the engine's memory).

Residents grow (every turn appends a tool's output and an answer). When a lane's
reservations pass `overflow_fraction x budget`, idle residents (no call queued or in
flight: they wait for a tool) are *suspended* until it fits again, chosen by cost and
benefit: the KV-seconds that suspending frees (context size x the time until the
program needs the GPU again, from its tool's predicted end, capped at `horizon_s`) against
what it costs (a recompute of the context, only if the engine evicts it before the
program returns, in proportion to the same size). Both scale with the context, so the
order is: longest predicted idle first, then the larger context; a program whose tool is
about to return (less than `min_idle_s` to go) is never a victim, since it would be back
before anything was gained. A suspended program re-enters the admission queue with its
next call.

Placement (`choose_lane`): the lane the program last ran on (its cache is there) if it
fits, else the lane with the most free KV after admitting it (worst fit: it leaves the
most room for everyone's growth); a lane with no residents takes any program that fits
its whole budget, so one huge program still runs. Lanes without a budget (unknown KV) are
not limited here (the in-flight limits hold).

A head of the admission queue that fits nowhere holds one lane (`reserved_lane`: the one
with the most free KV, where it fits soonest); programs behind it may be admitted to the
other lanes meanwhile (backfilling, `Scheduler.admit_waiting`), so memory that frees
elsewhere is not left idle while the head waits, and the head is not starved: nothing else
is admitted to its lane.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from treadle.runtime.sched.entities import Lane, Program


@dataclass(frozen=True)
class ResidencyConfig:
    """Knobs of KV residency (module docstring)."""

    #: admit while reservations + the newcomer's working set <= this x budget
    admit_fraction: float = 0.9
    #: suspend idle residents while reservations > this x budget
    overflow_fraction: float = 1.0
    #: predicted idle time beyond this counts no more (the prediction is not that good)
    horizon_s: float = 60.0
    #: a resident whose tool returns sooner than this is not suspended
    min_idle_s: float = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.admit_fraction <= self.overflow_fraction:
            raise ValueError("need 0 < admit_fraction <= overflow_fraction")
        if self.horizon_s <= 0 or self.min_idle_s < 0:
            raise ValueError("horizon_s must be > 0 and min_idle_s >= 0")


def fits(lane: Lane, need: int, config: ResidencyConfig) -> bool:
    """Whether `lane` can admit a program that needs `need` KV tokens."""
    if lane.kv_budget is None:
        return True
    if not lane.residents:
        return need <= lane.kv_budget
    return lane.kv_reserved + need <= config.admit_fraction * lane.kv_budget


def choose_lane(
    p: Program, lanes: Sequence[Lane], config: ResidencyConfig, exclude: int | None = None
) -> int | None:
    """The lane to admit `p` to, or None when none has room (module docstring); never
    lane `exclude` (the lane held for a blocked head, see `reserved_lane`)."""
    need = p.kv_tokens
    home = p.home
    home_lane = lanes[home] if home is not None and home != exclude and home < len(lanes) else None
    if home_lane is not None and fits(home_lane, need, config):
        return home_lane.index
    best: Lane | None = None
    best_key: tuple[float, int, int] = (0.0, 0, 0)
    name = p.tenant.name
    for lane in lanes:
        if lane.index == exclude or not fits(lane, need, config):
            continue
        free = lane.kv_free() - need
        share = free / lane.kv_budget if lane.kv_budget else math.inf
        key = (-share, lane.tenant_homed.get(name, 0), lane.index)
        if best is None or key < best_key:
            best, best_key = lane, key
    return None if best is None else best.index


def reserved_lane(p: Program, lanes: Sequence[Lane]) -> int:
    """The lane held for a head `p` that fits nowhere: the one with the most free KV, where
    it will fit soonest (its own lane on a tie: its cache may still be there)."""
    return max(lanes, key=lambda ln: (ln.kv_free(), ln.index == p.home, -ln.index)).index


def overflowing(lane: Lane, config: ResidencyConfig) -> bool:
    return lane.kv_budget is not None and lane.kv_reserved > (
        config.overflow_fraction * lane.kv_budget
    )


def choose_victims(lane: Lane, now: float, config: ResidencyConfig) -> list[Program]:
    """Idle residents to suspend until `lane` fits again, best first (module docstring).
    Costs O(residents of the lane)."""
    assert lane.kv_budget is not None
    excess = lane.kv_reserved - config.overflow_fraction * lane.kv_budget
    if excess <= 0:
        return []
    candidates = []
    for p in lane.residents.values():
        if p.busy:
            continue
        idle = min(config.horizon_s, p.idle_until - now)
        if idle < config.min_idle_s:
            continue
        candidates.append((idle, p.kv_tokens, -p.seq, p))
    candidates.sort(reverse=True, key=lambda c: c[:3])
    out: list[Program] = []
    for *_, p in candidates:
        if excess <= 0:
            break
        out.append(p)
        excess -= p.kv_tokens
    return out
