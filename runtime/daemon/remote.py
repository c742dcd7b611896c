"""`treadle remote ...`: a daemon's runs and workflows from the command line.

    export TREADLE_URL=https://treadle.example:8080 TREADLE_API_KEY=trd_...
    treadle remote submit examples/approval.yaml -i '{"cmd": "ls"}'
    treadle remote runs --status waiting
    treadle remote logs 3f2a --follow
    treadle remote resume 3f2a -i '{"approved": true}'

Every command takes `--url`/`--key` (or `TREADLE_URL`/`TREADLE_API_KEY`) and `--json`
(the API's JSON, for scripts; without it, tables and lines for people). A run is named by
its full id or by a prefix that only it has (`DaemonClient.resolve`). Errors are one line
on stderr and exit 2 (a run that failed: 1; waiting for input: 3, as `treadle run`).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from treadle.runtime.daemon.cli import (
    DEFAULT_URL,
    KeyOpt,
    UrlOpt,
    _fail,
    console,
    err_console,
    input_value,
)

app = typer.Typer(
    help="A daemon's runs and workflows (TREADLE_URL, TREADLE_API_KEY).", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
RunArg = Annotated[str, typer.Argument(help="A run id, or a prefix only it has.")]
#: exit codes of a run that failed, and of one that waits for input
EXIT_FAILED, EXIT_WAITING = 1, 3


def _client(url: str, key: str) -> Any:
    from treadle.runtime.daemon.client import DaemonClient

    try:
        return DaemonClient(url, key)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _call(fn: Any) -> Any:
    """`fn()`, its errors one line on stderr and exit 2 (no traceback)."""
    import httpx

    from treadle.runtime.daemon.client import ClientError

    try:
        return fn()
    except ClientError as exc:
        raise _fail(f"{exc.status} {exc.code}: {exc.message}") from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the daemon: {exc}") from None


def _inputs(raw: str | None) -> dict[str, Any]:
    value = input_value(raw) if raw is not None else {}
    if not isinstance(value, dict):
        raise _fail("--input must be a JSON object of input names to values")
    return value


def _event_line(event: dict[str, Any]) -> str:
    skip = {"seq", "run_id", "ts", "kind"}
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip and v is not None)
    return f"{event.get('seq', '?'):>5} {event.get('kind', '?'):<20} {rest}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _show_run(run: dict[str, Any]) -> None:
    """A run for a person: its fields, then its output or error, then what it waits for."""
    version = run.get("workflow_version")
    lines = [
        f"run       {run['run_id']}",
        f"workflow  {run['workflow']}" + (f" (version {version})" if version else ""),
        f"status    {run['status']}" + (" (cancel requested)" if run["cancel_requested"] else ""),
        f"created   {_when(run['created_at'])}",
        f"updated   {_when(run['updated_at'])}",
        f"inputs    {json.dumps(run['inputs'])}",
    ]
    if run.get("output") is not None:
        lines.append(f"output    {json.dumps(run['output'], indent=2)}")
    if run.get("error"):
        lines.append(f"error     {run['error']}")
    for request in run.get("pending_inputs") or []:
        lines.append(f"waiting   {request['node']}: {request['prompt']}")
        lines.append(f"          answer: treadle remote resume {run['run_id'][:12]} "
                     f"--node {request['node']} --input JSON")  # fmt: skip
    console.print("\n".join(lines), highlight=False, markup=False)


def _exit_for(run: dict[str, Any]) -> None:
    if run["status"] == "waiting":
        raise typer.Exit(EXIT_WAITING)
    if run["status"] in ("failed", "cancelled"):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def submit(
    workflow: Annotated[
        str, typer.Argument(help="A workflow file (registered first) or a registered name.")
    ],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="Inputs as JSON, or @file.json.")
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="Run this version of the workflow (default: latest).")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait until it finishes or waits for input; show it.")
    ] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = "",
) -> None:
    """Submit a run; print its id.

    Given a file, its definition is registered first. With --wait, the run is shown once
    it has finished (exit 1 if it failed) or waits for input (exit 3)."""
    inputs = _inputs(input)
    path = Path(workflow)
    with _client(url, key) as client:
        name = workflow
        if path.is_file():
            fmt = "json" if path.suffix.lower() == ".json" else "yaml"
            info = _call(lambda: client.register(path.read_text(), fmt, path.name))
            name = info["name"]
            err_console.print(f"registered {name} (version {info['version']})", highlight=False)
        run = _call(lambda: client.submit(name, inputs, version=version))
        if wait:
            run = _call(lambda: client.wait(run["run_id"]))
    if as_json:
        _print_json(run)
    elif wait:
        _show_run(run)
    else:
        print(run["run_id"])
    if wait:
        _exit_for(run)


@app.command()
def runs(
    status: Annotated[
        str | None,
        typer.Option(help="Only runs with this status (pending, running, waiting, ...)."),
    ] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Only runs whose id starts so.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first (1-500).")] = 20,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = "",
) -> None:
    """The tenant's runs, newest first."""
    with _client(url, key) as client:
        page = _call(
            lambda: client.runs(status=status, workflow=workflow, id_prefix=prefix, limit=limit)
        )
    if as_json:
        _print_json(page)
        return
    table = Table()
    # full ids, whatever the terminal's width: they are what the other commands take
    table.add_column("run", no_wrap=True, min_width=32)
    for column in ("workflow", "status", "created", "error"):
        table.add_column(column)
    for run in page["runs"]:
        version = run.get("workflow_version")
        name = f"{run['workflow']} v{version}" if version else run["workflow"]
        error = (run.get("error") or "")[:60]
        table.add_row(run["run_id"], name, run["status"], _when(run["created_at"]), error)
    console.print(table)
    if page.get("next_cursor"):
        err_console.print("(more: raise --limit, or filter)", style="dim")


@app.command()
def get(
    run_id: RunArg, as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL, key: KeyOpt = ""
) -> None:
    """A run: status, inputs, output or error, and the requests it waits on."""
    with _client(url, key) as client:
        run = _call(lambda: client.get_run(client.resolve(run_id)))
    if as_json:
        _print_json(run)
    else:
        _show_run(run)


@app.command()
def logs(
    run_id: RunArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")
    ] = False,
    after: Annotated[int, typer.Option(help="Only events after this seq.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON event per line.")] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = "",
) -> None:
    """A run's events (with --follow, live, until it ends; reconnects by itself)."""
    with _client(url, key) as client:

        def show() -> None:
            full = client.resolve(run_id)
            for event in client.events(full, after=after, follow=follow):
                print(json.dumps(event) if as_json else _event_line(event), flush=True)

        _call(show)


@app.command()
def cancel(
    run_id: RunArg, as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL, key: KeyOpt = ""
) -> None:
    """Ask for a run to be cancelled (its worker stops it)."""
    with _client(url, key) as client:
        run = _call(lambda: client.cancel(client.resolve(run_id)))
    if as_json:
        _print_json(run)
    else:
        print(f"cancel requested for {run['run_id']} ({run['status']})")


@app.command()
def resume(
    run_id: RunArg,
    input: Annotated[str, typer.Option("--input", "-i", help="The answer: JSON, or @file.json.")],
    node: Annotated[
        str | None, typer.Option(help="The request answered, when the run waits on several.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="The same answer again changes nothing."),
    ] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = "",
) -> None:
    """Answer a waiting run's request for input; the run goes on (queued for a worker)."""
    value = input_value(input)
    with _client(url, key) as client:
        out = _call(
            lambda: client.answer(client.resolve(run_id), value, node=node, key=idempotency_key)
        )
    if as_json:
        _print_json(out)
        return
    again = " (the same answer again: nothing changed)" if out["replayed"] else ""
    print(f"answered {out['node']} of {out['run_id']}: now {out['status']}{again}")
    for request in out["pending_inputs"]:
        print(f"still waiting: {request['node']}: {request['prompt']}")


@app.command()
def workflows(as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL, key: KeyOpt = "") -> None:
    """The tenant's workflows, each at its latest version."""
    with _client(url, key) as client:
        found = _call(client.workflows)
    if as_json:
        _print_json(found)
        return
    table = Table("name", "version", "digest", "registered", "nodes")
    for wf in found["workflows"]:
        table.add_row(wf["name"], str(wf["version"]), wf["digest"][:12],
                      _when(wf["updated_at"]), str(len(wf["nodes"])))  # fmt: skip
    console.print(table)


@app.command()
def versions(
    name: Annotated[str, typer.Argument(help="A registered workflow name.")],
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = "",
) -> None:
    """Every version of a workflow, oldest first."""
    with _client(url, key) as client:
        found = _call(lambda: client.versions(name))
    if as_json:
        _print_json(found)
        return
    table = Table("version", "digest", "registered", "nodes")
    for wf in found["versions"]:
        table.add_row(str(wf["version"]), wf["digest"][:12], _when(wf["updated_at"]),
                      ", ".join(wf["nodes"]))  # fmt: skip
    console.print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="A registered workflow name.")],
    version: Annotated[int | None, typer.Option(help="This version (default: latest).")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = "",
) -> None:
    """Print a workflow's definition (its latest version, or `--version`)."""
    with _client(url, key) as client:
        found = _call(lambda: client.workflow(name, version))
    print(found["definition"], end="")
