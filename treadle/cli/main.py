"""The `treadle` command line: run, validate, draw and describe workflows; benchmarks;
the simulator server."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.live import Live

from treadle.cli.programs import ProgramNotFound, load_program
from treadle.graphs.compile import GraphValidationError, compile_graph

app = typer.Typer(
    name="treadle",
    help="An async runtime for agent workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Reproducible benchmarks (treadle and baselines in one run).")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)

ProgramArg = Annotated[
    str, typer.Argument(help="A workflow file (.yaml/.json) or a Python graph (file.py:attr).")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _load(ref: str) -> Any:
    from treadle.graphs.files.loader import WorkflowFileError

    try:
        return load_program(ref)
    except (ProgramNotFound, WorkflowFileError) as exc:
        raise _fail(str(exc)) from None


def _parse_inputs(raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if raw.startswith("@"):
        from treadle.runtime.daemon.cli import load_data_file

        path = Path(raw[1:])
        if not path.exists():
            raise _fail(f"--input {raw}: no such file")
        value = load_data_file(path, "--input")
    else:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _fail(f"--input is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _fail("--input must be a JSON object of input names to values")
    return value


def default_db() -> Path:
    home = Path(os.environ.get("TREADLE_HOME", Path.home() / ".treadle"))
    return home / "runs.db"


def _open_store(store: str, db: Path | None) -> Any:
    if store == "memory":
        from treadle.runtime.stores.memory import MemoryStore

        return MemoryStore()
    if store == "sqlite":
        from treadle.runtime.stores.sqlite import SqliteStore

        path = db or default_db()
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteStore(path)
    if store.startswith(("redis://", "rediss://", "unix://")):
        from treadle.runtime.stores.redis import RedisStore

        return RedisStore(store)
    raise _fail(f"--store must be memory, sqlite or a redis:// URL, not {store!r}")


StoreOpt = Annotated[
    str, typer.Option("--store", help="memory, sqlite (default) or a redis:// URL.")
]
DbOpt = Annotated[
    Path | None, typer.Option("--db", help="SQLite file (default ~/.treadle/runs.db).")
]


@app.command()
def run(
    program: Annotated[str | None, typer.Argument(help="Workflow file or file.py:attr.")] = None,
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="Inputs as JSON, or @file.json/@file.yaml.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Resume an interrupted run by id.")
    ] = None,
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
) -> None:
    """Run a workflow and print its result.

    Traced with OpenTelemetry when OTEL_TRACES_EXPORTER is set (console, otlp)."""
    from treadle.runtime.execution.runtime import InvalidInputs, Runtime
    from treadle.runtime.observe.tracing import TracingUnavailable, configure_tracing

    started: list[str] = []  # the run's id, once it exists
    try:
        tracer = configure_tracing(set_global=True)
    except (ValueError, TracingUnavailable) as exc:
        raise _fail(str(exc)) from None

    async def main() -> int:
        state = _open_store(store, db)
        runtime = Runtime(store=state, listeners=[tracer.listener] if tracer else [])
        try:
            if resume is not None:
                record = await state.get_run(resume)
                if record is None:
                    raise _fail(f"no run {resume!r} in the store")
                ref = program or record.source
                if ref is None:
                    raise _fail("this run does not record its program; pass it as an argument")
                cg = runtime.compile(_load(ref))
                started.append(resume)
                result = await _watch(runtime, cg, None, as_json, resume_id=resume)
            else:
                if program is None:
                    raise _fail("missing the workflow to run")
                cg = runtime.compile(_load(program))
                result = await _watch(
                    runtime,
                    cg,
                    _parse_inputs(input),
                    as_json,
                    source=_source_of(program),
                    on_start=started.append,
                )
        except (GraphValidationError, InvalidInputs) as exc:
            raise _fail(str(exc)) from None
        except anyio.get_cancelled_exc_class():
            # Ctrl-C: the runtime has made the finished nodes durable; say so in the record
            with anyio.CancelScope(shield=True):
                if started:
                    await state.update_run(
                        started[0], status="interrupted", error="interrupted; resumable"
                    )
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await runtime.aclose()
            if tracer is not None:
                tracer.shutdown()  # ends what is open and flushes the exporters
        return 0 if result.ok else 1

    try:
        code = anyio.run(main)
    except KeyboardInterrupt:
        hint = f": resume with `treadle run --resume {started[0]}`" if started else ""
        err_console.print(f"[yellow]interrupted[/]{hint}", highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        # the journal is durable; do not wait for abandoned worker threads to finish
        os._exit(130)
    raise typer.Exit(code)


def _source_of(program: str) -> str:
    """The program reference as it will still work from another directory."""
    file_part, sep, attr = program.partition(":")
    path = Path(file_part)
    if path.suffix and path.exists():
        return str(path.resolve()) + sep + attr
    return program


async def _watch(
    runtime: Any,
    cg: Any,
    inputs: dict[str, Any] | None,
    as_json: bool,
    *,
    source: str | None = None,
    resume_id: str | None = None,
    on_start: Any = None,
) -> Any:
    from treadle.cli.display import RunView, render_result

    view = RunView(list(cg.nodes))
    live_ok = not as_json and console.is_terminal
    if resume_id is not None:
        result = await runtime.resume(resume_id, cg, check=False)
        for event in result.events:
            view.feed(event)
    else:
        async with runtime.start(cg, inputs, source=source) as handle:
            if on_start is not None:
                on_start(handle.run_id)
            if live_ok:
                with Live(view.table(), console=console, refresh_per_second=10) as live:
                    async for event in handle.events():
                        view.feed(event)
                        live.update(view.table())
            else:
                async for event in handle.events():
                    view.feed(event)
            result = await handle.result()
    if as_json:
        output = result.output
        dumped = output.model_dump(mode="json") if hasattr(output, "model_dump") else output
        payload = {
            "run_id": result.run_id,
            "status": result.status,
            "output": dumped,
            "error": result.error,
            "duration_s": round(result.duration_s, 6),
        }
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        from treadle.runtime.observe.metrics import graph_deps, summarize_run

        if not live_ok:
            console.print(view.table())
        render_result(console, result, view)
        if result.events:
            summary = summarize_run(result.events, deps=graph_deps(cg))
            for line in summary.lines()[1:]:  # the first repeats the panel's subtitle
                console.print(line, style="dim", highlight=False)
    return result


@app.command()
def validate(program: ProgramArg) -> None:
    """Check a workflow without running it."""
    spec = _load(program)
    try:
        cg = compile_graph(spec)
    except GraphValidationError as exc:
        raise _fail(str(exc), 1) from None
    facts = cg.facts
    console.print(
        f"[green]ok[/] {spec.name}: {len(cg.nodes)} nodes, "
        f"critical path {' → '.join(facts.critical_path)} "
        f"(~{facts.critical_path_cost_s:.2f} s estimated)",
        highlight=False,
    )


@app.command()
def graph(
    program: ProgramArg,
    format: Annotated[str, typer.Option("--format", "-f", help="mermaid, dot or png.")] = "mermaid",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Also draw the tasks this run's planners added.")
    ] = None,
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
) -> None:
    """Draw a workflow as Mermaid, Graphviz DOT, or PNG."""
    from treadle.graphs.render import to_dot, to_mermaid, to_png

    spec = _load(program)
    extra = _run_extensions(run_id, store, db) if run_id else []
    if format == "png":
        if output is None:
            raise _fail("--format png needs --output FILE.png")
        try:
            to_png(spec, output, extra)
        except RuntimeError as exc:
            raise _fail(str(exc), 1) from None
        return
    if format not in ("mermaid", "dot"):
        raise _fail(f"--format must be mermaid, dot or png, not {format!r}")
    text = to_mermaid(spec, extra) if format == "mermaid" else to_dot(spec, extra)
    if output is not None:
        output.write_text(text)
    else:
        sys.stdout.write(text)


def _run_extensions(run_id: str, store: str, db: Path | None) -> list[Any]:
    """The DAG extensions a run recorded: its planners' tasks, from their checkpoints."""
    from treadle.graphs.render import DynamicNode
    from treadle.runtime.nodes.planner.executor import planned_tasks

    outputs = _read_run(run_id, store, db, lambda state: state.load_outputs(run_id))
    return [
        DynamicNode(t.planner, t.instance, f"task{t.idx}: {t.tool}", t.deps)
        for t in planned_tasks(outputs)
    ]


def _read_run(
    run_id: str, store: str, db: Path | None, read: Callable[[Any], Awaitable[Any]]
) -> Any:
    """`read(state)` on the store, once it is known to hold run `run_id`."""

    async def main() -> Any:
        state = _open_store(store, db)
        try:
            if await state.get_run(run_id) is None:
                raise _fail(f"no run {run_id!r} in the store")
            return await read(state)
        finally:
            await state.close()

    return anyio.run(main)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the workflow file format."""
    from treadle.graphs.files.schema import workflow_json_schema

    typer.echo(json.dumps(workflow_json_schema(), indent=2))


@app.command()
def runs(
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
) -> None:
    """List recorded runs."""
    from rich.table import Table

    async def main() -> list[Any]:
        state = _open_store(store, db)
        try:
            return list(await state.list_runs(limit=limit, status=status))
        finally:
            await state.close()

    records = anyio.run(main)
    table = Table("run", "graph", "status", "created", "error")
    import datetime as dt

    for r in records:
        created = dt.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(r.run_id, r.graph, r.status, created, (r.error or "")[:60])
    console.print(table)


@app.command()
def trace(
    run_id: Annotated[str, typer.Argument(help="The run to draw.")],
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the timeline as JSON.")] = False,
) -> None:
    """Draw a run's timeline from its journal: a waterfall of its nodes, LLM and tool calls."""
    from treadle.cli.trace_view import trace_command

    events = _read_run(run_id, store, db, lambda state: state.read_events(run_id))
    if not events:
        raise _fail(f"run {run_id!r} has no events yet")
    trace_command(events, as_json=as_json, console=console)


#: `treadle bench NAME` -> the module whose `main` runs it
BENCHMARKS = {
    "overhead": "treadle.benchmarks.overhead",
    "dispatch": "treadle.benchmarks.dispatch",
    "agents": "treadle.benchmarks.agents.bench",
    "parallel": "treadle.benchmarks.parallel",
    "service": "treadle.benchmarks.service",
}


def _register_subcommands() -> None:
    import importlib

    from treadle.cli.sim import app as sim_app
    from treadle.runtime.daemon.cli import register

    for name, module_name in BENCHMARKS.items():
        bench_app.command(name)(importlib.import_module(module_name).main)
    app.add_typer(sim_app, name="sim")
    register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
