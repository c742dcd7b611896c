"""Tracing's cost per node on `treadle bench overhead`'s shapes (not a test: run it).

    python tests/observability/overhead_tracing.py [--nodes 1000] [--reps 15]

Systems, all on the memory store and in one process: `treadle` (no listener),
`treadle+tracing-off` (what `configure_tracing()` gives with no OTEL_TRACES_EXPORTER:
no listener), `treadle+tracing` (the OpenTelemetry listener, spans kept in memory,
exported synchronously), `treadle+tracing-batch` (BatchSpanProcessor, as
`configure_tracing()` sets up for console/otlp, to an exporter that drops the spans) and
`treadle+metrics` (the Prometheus listener). Prints µs per node (median of the reps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import anyio

from treadle.benchmarks.overhead import SHAPES, treadle_graph
from treadle.runtime.core.context import Listener
from treadle.runtime.execution.runtime import Runtime
from treadle.runtime.observe.metrics import RuntimeMetrics
from treadle.runtime.observe.tracing import OtelTracer
from treadle.runtime.observe.tracing_setup import configure_tracing


def _dropping_batch_tracer() -> OtelTracer:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=1 << 16))
    return OtelTracer(provider, owns_provider=True)


def systems() -> dict[str, tuple[list[Listener], Any]]:
    os.environ.pop("OTEL_TRACES_EXPORTER", None)
    off = configure_tracing()
    assert off is None, "tracing off must install nothing"
    memory, exporter = OtelTracer.in_memory()
    batch = _dropping_batch_tracer()
    metrics = RuntimeMetrics()
    return {
        "treadle": ([], None),
        "treadle+tracing-off": ([off.listener] if off else [], None),
        "treadle+tracing": ([memory.listener], exporter),
        "treadle+tracing-batch": ([batch.listener], None),
        "treadle+metrics": ([metrics.listener], None),
    }


async def measure(n: int, reps: int) -> dict[str, dict[str, float]]:
    """Interleaved: each repetition runs every system on every shape in turn, so a change
    in the machine's load hits all systems alike (the machine is shared)."""
    graphs = {shape: treadle_graph(shape, n) for shape in SHAPES}
    setups = systems()
    runtimes = {name: Runtime(listeners=listeners) for name, (listeners, _) in setups.items()}
    compiled = {
        (name, shape): runtimes[name].compile(graph)
        for name in setups
        for shape, (graph, _) in graphs.items()
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in compiled}
    for rep in range(reps + 1):  # the first round warms up
        for name, (_, exporter) in setups.items():
            for shape in SHAPES:
                started = time.perf_counter()
                await runtimes[name].run(compiled[(name, shape)], {"x": 0})
                took = time.perf_counter() - started
                if rep:
                    times[(name, shape)].append(took)
                if exporter is not None:
                    exporter.clear()
    return {
        name: {
            shape: statistics.median(times[(name, shape)]) / graphs[shape][1] * 1e6
            for shape in SHAPES
        }
        for name in setups
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    results = anyio.run(measure, args.nodes, args.reps)
    print(f"µs per node (median of {args.reps}), memory store, {args.nodes} nodes")
    print(f"{'system':24}" + "".join(f"{s:>10}" for s in SHAPES))
    for name, row in results.items():
        print(f"{name:24}" + "".join(f"{row[s]:10.1f}" for s in SHAPES))


if __name__ == "__main__":
    main()
