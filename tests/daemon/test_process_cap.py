"""`treadle serve --max-concurrent-runs N`: a real server process on the test's private Redis,
with two worker loops of four slots each, runs at most N runs at once (its workers share N
slots), and every run still finishes. The models it offers come from `--models FILE`."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import pytest
from daemon_support import REPO, Daemon, journal
from redis_support import free_port

from treadle.runtime.core.events import RunFinished, RunStarted
from treadle.testing.processes import DaemonProcess

pytestmark = pytest.mark.anyio

CAP = 3
RUNS = 8

#: one model alias from the operator's --models file; each run is three slow calls
WORKFLOW = """\
name: capped
inputs:
  topic: str
nodes:
  - {id: a, kind: llm, model: shared, prompt: "One on {t}", inputs: {t: $input.topic}}
  - {id: b, kind: llm, model: shared, prompt: "Two on {x}", inputs: {x: $a}}
  - {id: c, kind: llm, model: shared, prompt: "Three on {x}", inputs: {x: $b}}
outputs:
  result: $c
"""


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (an end at t comes before a start at t)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    open_now = most = 0
    for _, step in edges:
        open_now += step
        most = max(most, open_now)
    return most


def test_max_overlap() -> None:
    assert max_overlap([(0, 1), (1, 2), (2, 3)]) == 1
    assert max_overlap([(0, 3), (1, 2), (1.5, 4)]) == 3


async def test_serve_runs_at_most_max_concurrent_runs_at_once(
    api_only: Daemon, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("# offered to every workflow\nshared: {backend: scripted, latency_s: 0.3}\n")
    port = free_port()
    server = DaemonProcess(
        [
            "serve", "--redis", api_only.config.redis_url, "--port", str(port),
            "--workers-per-process", "2", "--concurrency", "4",
            "--max-concurrent-runs", str(CAP), "--models", str(models),
            "--lease-ms", "2000", "--log-level", "warning",
        ],
        tmp_path / "serve.log",
        cwd=REPO,
    ).start()  # fmt: skip
    try:
        key = await api_only.tenant("acme")
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                await anyio.sleep(0.1)
            registered = await client.post("/v1/workflows", json={"definition": WORKFLOW})
            assert registered.status_code == 201, registered.text
            run_ids = []
            for i in range(RUNS):
                body = {"workflow": "capped", "inputs": {"topic": f"t{i}"}}
                submitted = await client.post("/v1/runs", json=body)
                assert submitted.status_code == 201, submitted.text
                run_ids.append(submitted.json()["run_id"])
            with anyio.fail_after(60):
                for run_id in run_ids:
                    while (await client.get(f"/v1/runs/{run_id}")).json()["status"] not in (
                        "succeeded", "failed", "cancelled"
                    ):  # fmt: skip
                        await anyio.sleep(0.05)
                    assert (await client.get(f"/v1/runs/{run_id}")).json()["status"] == "succeeded"
    finally:
        server.stop()
    spans = []
    for run_id in run_ids:
        events = await journal(api_only.services.store, run_id)
        started = next(e.ts for e in events if isinstance(e, RunStarted))
        finished = next(e.ts for e in events if isinstance(e, RunFinished))
        spans.append((started, finished))
    # 2 loops x 4 slots would run all eight at once; the process cap holds it to three
    # (and the loops do share them: more than one run at a time)
    assert 2 <= max_overlap(spans) <= CAP, spans
