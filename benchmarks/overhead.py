"""`treadle bench overhead`: what the orchestrator itself costs per node.

Shapes of trivial nodes (no I/O): `chain` (N nodes in a line), `fanout` (1 → N → 1) and
`diamond` (depth 10 × width 10, each layer joined to the next). Systems: treadle on each
store, and LangGraph (the `bench` extra) building the same shapes, in the same process.
Metric: wall-clock microseconds per node, the median of the repetitions after a warm-up.
"""

from __future__ import annotations

import itertools
import operator
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from treadle.benchmarks.common import print_table, write_report
from treadle.graphs.builder import Graph
from treadle.graphs.compile import CompiledGraph
from treadle.runtime.core.store import StateStore
from treadle.runtime.execution.runtime import Runtime

SHAPES = ("chain", "fanout", "diamond")


def _step(x: int) -> int:
    return x + 1


def _join(**parts: int) -> int:
    return sum(parts.values())


# -- treadle --------------------------------------------------------------------------


def treadle_graph(shape: str, n: int, depth: int = 10, width: int = 10) -> tuple[Graph, int]:
    """The shape as a treadle graph, and its node count."""
    g = Graph(f"{shape}-{n}", inputs={"x": int})
    if shape == "chain":
        prev: Any = g.input.x
        for i in range(n):
            prev = g.func(f"n{i}", _step, inputs={"x": prev}).out
        g.output(out=prev)
        return g, n
    if shape == "fanout":
        root = g.func("root", _step, inputs={"x": g.input.x})
        leaves = {f"p{i}": g.func(f"n{i}", _step, inputs={"x": root}).out for i in range(n)}
        g.output(out=g.func("join", _join, inputs=leaves).out)
        return g, n + 2
    if shape == "diamond":
        root = g.func("root", _step, inputs={"x": g.input.x})
        layer = {"p0": root.out}
        for d in range(depth):
            layer = {f"p{w}": g.func(f"d{d}_{w}", _join, inputs=layer).out for w in range(width)}
        g.output(out=g.func("sink", _join, inputs=layer).out)
        return g, depth * width + 2
    raise ValueError(f"unknown shape {shape!r}")


async def time_treadle(runtime: Runtime, cg: CompiledGraph, reps: int) -> list[float]:
    await runtime.run(cg, {"x": 0})  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        await runtime.run(cg, {"x": 0})
        times.append(time.perf_counter() - started)
    return times


async def _us_per_node(
    runtime: Runtime, n: int, reps: int, after: Callable[[], object] = lambda: None
) -> dict[str, float]:
    """Every shape on `runtime`: the median µs per node; `after` runs after each shape's
    timings (outside them)."""
    out = {}
    for shape in SHAPES:
        graph, count = treadle_graph(shape, n)
        times = await time_treadle(runtime, runtime.compile(graph), reps)
        after()
        out[f"{shape}_us_per_node"] = statistics.median(times) / count * 1e6
    return out


# -- LangGraph ------------------------------------------------------------------------


def langgraph_app(shape: str, n: int, depth: int = 10, width: int = 10) -> Any:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        total: Annotated[int, operator.add]

    def node(state: State) -> dict[str, int]:
        return {"total": 1}

    g = StateGraph(State)
    if shape == "chain":
        names = [f"n{i}" for i in range(n)]
        for name in names:
            g.add_node(name, node)
        g.add_edge(START, names[0])
        for a, b in itertools.pairwise(names):
            g.add_edge(a, b)
        g.add_edge(names[-1], END)
    elif shape == "fanout":
        g.add_node("root", node)
        g.add_node("join", node)
        g.add_edge(START, "root")
        leaves = [f"n{i}" for i in range(n)]
        for leaf in leaves:
            g.add_node(leaf, node)
            g.add_edge("root", leaf)
        g.add_edge(leaves, "join")
        g.add_edge("join", END)
    elif shape == "diamond":
        g.add_node("root", node)
        g.add_edge(START, "root")
        prev = ["root"]
        for d in range(depth):
            layer = [f"d{d}_{w}" for w in range(width)]
            for name in layer:
                g.add_node(name, node)
                g.add_edge(prev, name)
            prev = layer
        g.add_node("sink", node)
        g.add_edge(prev, "sink")
        g.add_edge("sink", END)
    return g.compile()


def time_langgraph(app: Any, reps: int, limit: int) -> list[float]:
    config = {"recursion_limit": limit + 10}
    app.invoke({"total": 0}, config)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        app.invoke({"total": 0}, config)
        times.append(time.perf_counter() - started)
    return times


# -- stores ---------------------------------------------------------------------------


def _store_factories(
    stores: list[str], redis_url: str | None, tmp: Path
) -> dict[str, Callable[[], Awaitable[StateStore]]]:
    factories: dict[str, Callable[[], Awaitable[StateStore]]] = {}
    for name in stores:
        if name == "memory":

            async def memory() -> StateStore:
                from treadle.runtime.stores.memory import MemoryStore

                return MemoryStore()

            factories["treadle"] = memory
        elif name == "sqlite":

            async def sqlite() -> StateStore:
                from treadle.runtime.stores.sqlite import SqliteStore

                return SqliteStore(tmp / "bench.db")

            factories["treadle-sqlite"] = sqlite
        elif name == "redis":
            if redis_url is None:
                raise typer.BadParameter("--stores redis needs --redis-url")

            async def redis(url: str = redis_url) -> StateStore:
                from treadle.runtime.stores.redis import RedisStore

                return RedisStore(url)

            factories["treadle-redis"] = redis
        else:
            raise typer.BadParameter(f"unknown store {name!r} (memory, sqlite, redis)")
    return factories


def _traced(n: int, reps: int) -> dict[str, dict[str, float]]:
    """`treadle+tracing`: the memory store with the OpenTelemetry listener, every span
    exported synchronously to memory (its whole cost is inside the measured time)."""
    from treadle.runtime.observe.tracing import OtelTracer, TracingUnavailable

    try:
        tracer, exporter = OtelTracer.in_memory()
    except TracingUnavailable:
        typer.echo("OpenTelemetry is not installed (pip install 'treadle[otel]'); skipping it")
        return {}

    async def measure() -> dict[str, float]:
        runtime = Runtime(listeners=[tracer.listener])
        try:
            return await _us_per_node(runtime, n, reps, after=exporter.clear)
        finally:
            await runtime.aclose()
            tracer.shutdown()

    return {"treadle+tracing": anyio.run(measure)}


def run_bench(
    *,
    n: int,
    reps: int,
    stores: list[str],
    redis_url: str | None,
    with_langgraph: bool,
    with_tracing: bool = False,
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for system, factory in _store_factories(stores, redis_url, Path(tmp)).items():

            async def measure(
                factory: Callable[[], Awaitable[StateStore]] = factory,
            ) -> dict[str, float]:
                runtime = Runtime(store=await factory())
                try:
                    return await _us_per_node(runtime, n, reps)
                finally:
                    await runtime.aclose()

            results[system] = anyio.run(measure)
    if with_tracing:
        results.update(_traced(n, reps))
    if with_langgraph:
        try:
            import langgraph  # noqa: F401
        except ImportError:
            typer.echo("langgraph is not installed (pip install 'treadle[bench]'); skipping it")
        else:
            out = {}
            for shape in SHAPES:
                _, count = treadle_graph(shape, n)
                app = langgraph_app(shape, n)
                times = time_langgraph(app, reps, count)
                out[f"{shape}_us_per_node"] = statistics.median(times) / count * 1e6
            results["langgraph"] = out
    return results


def main(
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes, for smoke runs.")] = False,
    nodes: Annotated[int, typer.Option("--nodes", help="Chain length and fan-out width.")] = 1000,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions (median).")] = 7,
    stores: Annotated[
        str, typer.Option("--stores", help="Comma list: memory,sqlite,redis.")
    ] = "memory,sqlite",
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", envvar="TREADLE_REDIS_URL")
    ] = None,
    with_langgraph: Annotated[bool, typer.Option("--langgraph/--no-langgraph")] = True,
    with_tracing: Annotated[
        bool, typer.Option("--tracing/--no-tracing", help="Also treadle with OpenTelemetry.")
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Orchestrator overhead per node: treadle vs LangGraph on trivial nodes."""
    if quick:
        nodes, reps = min(nodes, 300), min(reps, 5)
    store_list = [s.strip() for s in stores.split(",") if s.strip()]
    if redis_url and "redis" not in store_list:
        store_list.append("redis")
    config = {
        "nodes": nodes,
        "reps": reps,
        "stores": store_list,
        "diamond": "10x10",
        "tracing": with_tracing,
    }
    typer.echo(f"bench overhead: {config}")
    results = run_bench(
        n=nodes,
        reps=reps,
        stores=store_list,
        redis_url=redis_url,
        with_langgraph=with_langgraph,
        with_tracing=with_tracing,
    )
    ratios: dict[str, Any] = {}
    for other, name in (
        ("langgraph", "langgraph_over_treadle"),
        ("treadle+tracing", "tracing_over_treadle"),
    ):
        if other in results and "treadle" in results:
            ratios.update(
                {
                    f"{name}_{shape}": results[other][f"{shape}_us_per_node"]
                    / results["treadle"][f"{shape}_us_per_node"]
                    for shape in SHAPES
                }
            )
    rows = [
        [system, *(r[f"{shape}_us_per_node"] for shape in SHAPES)] for system, r in results.items()
    ]
    print_table("µs per node (median)", ["system", *SHAPES], rows)
    for key, value in ratios.items():
        typer.echo(f"{key}: {value:.1f}x")
    write_report(json_path, "overhead", config, results, ratios)
