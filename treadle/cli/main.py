"""The `treadle` command line: run, validate, draw and describe workflows; benchmarks;
the simulator server."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from treadle.cli.programs import ProgramNotFound, load_program
from treadle.graphs.compile import GraphValidationError, compile_graph
from treadle.runtime.daemon.cli import problem_text

app = typer.Typer(
    name="treadle",
    help="An async runtime for agent workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Reproducible benchmarks (treadle and baselines in one run).")
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"treadle {version('treadle')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """An async runtime for agent workflows."""


console = Console()
err_console = Console(stderr=True)

ProgramArg = Annotated[
    str, typer.Argument(help="A workflow file (.yaml/.json) or a Python graph (file.py:attr).")
]


def _fail(problem: str | GraphValidationError, code: int = 2) -> typer.Exit:
    """Report a problem (every problem of an invalid graph) on stderr, one line each
    (`problem_text`), and exit with `code`."""
    if isinstance(problem, GraphValidationError):
        n = len(problem.issues)
        lines = [str(i) for i in problem.issues]
        lines.append(f"graph {problem.graph!r} is invalid ({n} problem{'s' if n != 1 else ''})")
    else:
        lines = problem.splitlines() or [""]
    for line in lines:
        err_console.print(problem_text(line), soft_wrap=True)
    return typer.Exit(code)


def _load(ref: str) -> Any:
    from treadle.graphs.files.loader import WorkflowFileError

    try:
        return load_program(ref)
    except (ProgramNotFound, WorkflowFileError) as exc:
        raise _fail(str(exc)) from None


def _parse_value(raw: str) -> Any:
    """A value given with --input: JSON, or @file (JSON or YAML)."""
    from treadle.runtime.daemon.cli import input_value

    return input_value(raw)


def _parse_inputs(raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    value = _parse_value(raw)
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


#: `treadle run` / `treadle resume`: the run waits for human input (`treadle resume`)
EXIT_WAITING = 3


@app.command()
def run(
    program: Annotated[str | None, typer.Argument(help="Workflow file or file.py:attr.")] = None,
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="Inputs as JSON, or @file.json/@file.yaml.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Resume an interrupted run by id (or a unique start)."),
    ] = None,
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
) -> None:
    """Run a workflow and print its result.

    Exits 1 when the run failed, 3 when it waits for input (answer with `treadle resume`).
    Traced with OpenTelemetry when OTEL_TRACES_EXPORTER is set (console, otlp)."""
    if resume is not None:
        _execute(program, None, as_json, store, db, resume_id=resume)
    else:
        _execute(program, _parse_inputs(input), as_json, store, db)


@app.command("resume")
def resume_run(
    run_id: Annotated[str, typer.Argument(help="The run to continue.")],
    input: Annotated[
        str | None,
        typer.Option(
            "--input", "-i", help="The answer to the run's request for input: JSON, or @file."
        ),
    ] = None,
    node: Annotated[
        str | None, typer.Option(help="The request answered, when the run waits on several.")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="The same answer again changes nothing."),
    ] = None,
    program: Annotated[
        str | None,
        typer.Option("--program", help="The workflow, if the run does not record it."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
) -> None:
    """Continue a waiting or interrupted run, answering its request for input.

    The answer (--input) is checked against the request's schema first; the run goes on
    from its journal, repeating no finished node."""
    answer = _parse_value(input) if input is not None else NO_ANSWER
    _execute(program, None, as_json, store, db, resume_id=run_id, answer=answer, node=node,
             key=key)  # fmt: skip


NO_ANSWER: Any = object()


def _execute(
    program: str | None,
    inputs: dict[str, Any] | None,
    as_json: bool,
    store: str,
    db: Path | None,
    *,
    resume_id: str | None = None,
    answer: Any = NO_ANSWER,
    node: str | None = None,
    key: str | None = None,
) -> None:
    """Run (or resume) a program with a live view, and exit with its outcome."""
    from treadle.runtime.execution.inputs import InputConflict, InputRejected
    from treadle.runtime.execution.runtime import InvalidInputs, InvalidModel, Runtime
    from treadle.runtime.observe.tracing import TracingUnavailable
    from treadle.runtime.observe.tracing_setup import configure_tracing

    started: list[str] = []  # the run's id, once it exists
    try:
        tracer = configure_tracing(set_global=True)
    except (ValueError, TracingUnavailable) as exc:
        raise _fail(str(exc)) from None

    async def main() -> int:
        state = _open_store(store, db)
        runtime = Runtime(store=state, listeners=[tracer.listener] if tracer else [])
        try:
            if resume_id is not None:
                record = await _find_run(state, resume_id)
                ref = program or record.source
                if ref is None:
                    raise _fail("this run does not record its program; pass it with --program")
                cg = runtime.compile(_load(ref))
                started.append(record.run_id)
                result = await _watch(
                    runtime, cg, None, as_json, resumed=record, answer=(answer, node, key)
                )
            else:
                if program is None:
                    raise _fail("missing the workflow to run")
                cg = runtime.compile(_load(program))
                result = await _watch(
                    runtime,
                    cg,
                    inputs,
                    as_json,
                    source=_source_of(program),
                    on_start=started.append,
                )
        except GraphValidationError as exc:
            raise _fail(exc) from None
        except (InvalidInputs, InvalidModel, InputRejected, InputConflict) as exc:
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
        if result.waiting:
            return EXIT_WAITING
        return 0 if result.ok else 1

    try:
        code = anyio.run(main)
    except KeyboardInterrupt:
        hint = f": resume with `treadle resume {started[0]}`" if started else ""
        err_console.print(Text.assemble(("interrupted", "yellow"), hint), soft_wrap=True)
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
    resumed: Any = None,
    answer: tuple[Any, str | None, str | None] | None = None,
    on_start: Any = None,
) -> Any:
    """Run (or, given the `resumed` run's record, resume) and show it: a live view in a
    terminal, then the result."""
    from treadle.cli.display import RunView, render_result
    from treadle.runtime.execution.inputs import answers_of, record_input

    view = RunView(list(cg.nodes))
    live_ok = not as_json and console.is_terminal
    if resumed is not None:
        value, node, key = answer if answer is not None else (NO_ANSWER, None, None)
        if value is not NO_ANSWER:  # checked against the request first (InputRejected)
            await record_input(
                runtime.store,
                answers_of(cg),
                resumed.run_id,
                value,
                node=node,
                key=key,
                record=resumed,
            )
        for event in await runtime.store.read_events(resumed.run_id):
            view.feed(event)  # what the run did before: finished nodes show as done
        opened = runtime.open_run(cg, resumed, resume=True)
    else:
        opened = runtime.start(cg, inputs, source=source)
    async with opened as handle:
        if on_start is not None:
            on_start(handle.run_id)
        # the view renders itself on every refresh, so running times move between events
        with Live(view, console=console, refresh_per_second=10) if live_ok else nullcontext():
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
            "pending_inputs": [r.model_dump(mode="json") for r in result.pending],
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
                console.print(line, style="dim", highlight=False, markup=False)
        if result.waiting:
            node = "" if len(result.pending) == 1 else " --node NODE"
            console.print(
                f"waiting for input: answer with `treadle resume {result.run_id}{node} "
                "--input JSON`",
                style="magenta",
                highlight=False,
            )
    return result


async def _find_run(state: Any, ref: str) -> Any:
    """The record of the run whose id is `ref`, or starts with `ref` (one run only)."""
    record = await state.get_run(ref)
    if record is not None:
        return record
    found = await state.run_ids_with_prefix(ref, limit=3) if ref else []
    if not found:
        raise _fail(f"no run {ref!r} in the store")
    if len(found) > 1:
        shown = ", ".join(sorted(found)[:2]) + (", ..." if len(found) > 2 else "")
        raise _fail(f"{ref!r} is the start of more than one run id ({shown}): give more of it")
    record = await state.get_run(found[0])
    if record is None:  # removed between the two reads
        raise _fail(f"no run {ref!r} in the store")
    return record


@app.command()
def validate(program: ProgramArg) -> None:
    """Check a workflow without running it."""
    from treadle.backends.factory import model_entry_problems
    from treadle.runtime.observe.metrics import counted

    spec = _load(program)
    try:
        cg = compile_graph(spec, check_model=model_entry_problems)
    except GraphValidationError as exc:
        raise _fail(exc, 1) from None
    facts = cg.facts
    console.print(
        Text.assemble(
            ("ok", "green"),
            f" {spec.name}: {counted(len(cg.nodes), 'node')}, "
            f"critical path {' → '.join(facts.critical_path)} "
            f"(~{facts.critical_path_cost_s:.2f} s estimated)",
        ),
        soft_wrap=True,
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

    outputs = _read_run(run_id, store, db, lambda state, full: state.load_outputs(full))
    return [
        DynamicNode(t.planner, t.instance, f"task{t.idx}: {t.tool}", t.deps)
        for t in planned_tasks(outputs)
    ]


def _read_run(
    run_id: str, store: str, db: Path | None, read: Callable[[Any, str], Awaitable[Any]]
) -> Any:
    """`read(state, full_id)` on the store, once it is known to hold run `run_id` (or one
    run whose id starts so)."""

    async def main() -> Any:
        state = _open_store(store, db)
        try:
            record = await _find_run(state, run_id)
            return await read(state, record.run_id)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """List recorded runs, newest first."""
    import datetime as dt
    from typing import get_args

    from rich.table import Table

    from treadle.runtime.core.store import RunStatus

    statuses = get_args(RunStatus)
    if status is not None and status not in statuses:
        raise _fail(f"--status must be one of {', '.join(statuses)}; not {status!r}")

    async def main() -> list[Any]:
        state = _open_store(store, db)
        try:
            return list(await state.list_runs(limit=limit, status=status))
        finally:
            await state.close()

    records = anyio.run(main)
    if as_json:
        fields = ("run_id", "graph", "status", "tenant", "created_at", "updated_at", "error")
        typer.echo(json.dumps([r.model_dump(include=set(fields)) for r in records], indent=2))
        return
    # ids whole (never cut or folded): they are what `trace` and `--resume` take
    table = Table("run", "graph", "status", "created", "error")
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max((len(r.run_id) for r in records), default=3)
    for r in records:
        created = dt.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(r.run_id, r.graph, r.status, created, (r.error or "")[:60])
    console.print(table)


@app.command()
def trace(
    run_id: Annotated[str, typer.Argument(help="The run to draw (its id, or a unique start).")],
    store: StoreOpt = "sqlite",
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the timeline as JSON.")] = False,
) -> None:
    """Draw a run's timeline from its journal: a waterfall of its nodes, LLM and tool calls."""
    from treadle.cli.trace_view import trace_command

    events = _read_run(run_id, store, db, lambda state, full: state.read_events(full))
    if not events:
        raise _fail(f"run {run_id!r} has no events yet")
    trace_command(events, as_json=as_json, console=console)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1).")] = 8787,
    db: DbOpt = None,
) -> None:
    """Open the web view of the runs in the local store (the one `treadle run` writes):
    the runs list, and each run's graph, timeline, nodes and token streams, live."""
    import uvicorn

    from treadle.runtime.daemon.api.ui.local import create_local_app

    path = db or default_db()
    if not path.exists():
        raise _fail(f"no run store at {path} yet: `treadle run` a workflow first")

    def load(source: str) -> Any:
        return compile_graph(load_program(source))

    err_console.print(f"treadle ui: http://127.0.0.1:{port}/ ({path})", highlight=False)
    uvicorn.run(create_local_app(path, load), host="127.0.0.1", port=port, log_level="warning")


#: `treadle bench NAME` -> the module whose `main` runs it
BENCHMARKS = {
    "overhead": "treadle.benchmarks.overhead",
    "dispatch": "treadle.benchmarks.dispatch",
    "agents": "treadle.benchmarks.agents.bench",
    "parallel": "treadle.benchmarks.parallel",
    "service": "treadle.benchmarks.service",
    "sse": "treadle.benchmarks.sse_latency",
}


def _register_subcommands() -> None:
    import importlib

    from treadle.cli.sim import app as sim_app
    from treadle.runtime.daemon.cli import register
    from treadle.runtime.daemon.remote import app as remote_app

    for name, module_name in BENCHMARKS.items():
        bench_app.command(name)(importlib.import_module(module_name).main)
    app.add_typer(sim_app, name="sim")
    app.add_typer(remote_app, name="remote")
    register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
