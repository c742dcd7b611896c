"""What every benchmark shares: the JSON report format and a readable table.

Report format (docs/benchmarks.md): `{"bench": NAME, "config": {...}, "results": {SYSTEM:
{METRIC: value}}, "ratios": {...}}`.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def data_dir() -> Path:
    """The benchmark data sets: `$TREADLE_DATA`, else the copies shipped in the package
    (`benchmarks/data/`, each folder with its upstream licence)."""
    env = os.environ.get("TREADLE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data"


def write_report(
    path: Path | None,
    bench: str,
    config: Mapping[str, Any],
    results: Mapping[str, Any],
    ratios: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the report; write it as JSON when `path` is given."""
    report = {"bench": bench, "config": dict(config), "results": results, "ratios": ratios}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    console: Console | None = None,
) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    (console or Console()).print(table)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.2f}"
        return f"{value:.3g}"
    return str(value)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
