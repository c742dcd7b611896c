"""Fairness measures of how service was shared (the benchmarks' and the gateway's reports)."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["jain_index"]


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal, 1/n at worst."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return float("nan")
    sq = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * sq) if sq > 0 else 1.0
