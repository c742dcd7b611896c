"""`treadle bench gateway --quick`: the simulator and the gateway as processes of their
own, both paths measured in one run, and the report's documented keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from treadle.cli.main import app


def test_quick_run_writes_added_latency_per_level(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    result = CliRunner().invoke(app, ["bench", "gateway", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["bench"] == "gateway"
    results = report["results"]
    for key in ("added_ttft_ms", "added_total_ms"):
        assert set(results[key]) == {"1", "10"}
        for level in results[key].values():
            assert set(level) == {"p50", "p99"} and all(math.isfinite(v) for v in level.values())
    for path in ("direct", "gateway"):
        assert results[path]["10"]["calls"] == 20
        assert results[path]["10"]["resent_on_a_new_connection"] >= 0
        assert results[path]["10"]["ttft_ms"]["p50"] > 0
    # added = the gateway's percentile minus the direct one, as documented
    d, g = results["direct"]["1"]["ttft_ms"]["p50"], results["gateway"]["1"]["ttft_ms"]["p50"]
    assert results["added_ttft_ms"]["1"]["p50"] == g - d
