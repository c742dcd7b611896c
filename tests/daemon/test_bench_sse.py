"""`treadle bench sse` follows more runs at once than a tenant's default stream limit: the
benchmark sizes the daemon's per-tenant limits to its load and measures every event."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.benchmarks.sse_latency import _bench
from treadle.testing.processes import RedisUnavailable

pytestmark = pytest.mark.anyio


async def test_more_runs_than_the_default_stream_limit(tmp_path: Path) -> None:
    try:
        report = await _bench(runs=18, steps=1, tokens=4, workdir=tmp_path)
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    # each run's stream and journal each see its run_started, node and run_finished events
    assert report["live"]["events"] >= 18 * 3
    assert report["journal"]["events"] >= 18 * 3
