"""The terminal view of a run: a live table of its nodes while it runs, and a readable
result afterwards."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from treadle.runtime.core.events import (
    CacheHit,
    Event,
    GraphExtended,
    InputRequested,
    LLMCallFinished,
    NodeFailed,
    NodeFinished,
    NodeRetrying,
    NodeSkipped,
    NodeStarted,
    ToolCallFinished,
)
from treadle.runtime.execution.runtime import RunResult
from treadle.runtime.observe.metrics import counted

_STYLE = {
    "pending": ("·", "dim"),
    "running": ("▶", "yellow"),
    "retrying": ("↻", "yellow"),
    "done": ("✓", "green"),
    "failed": ("✗", "red"),
    "skipped": ("−", "dim"),
    "waiting": ("?", "magenta"),
}


@dataclass
class _Row:
    state: str = "pending"
    started: float = 0.0
    duration: float | None = None
    attempt: int = 1
    note: str = ""
    children: set[str] = field(default_factory=set)
    children_done: int = 0


class RunView:
    """Folds events into per-node rows; renders them as a rich table."""

    def __init__(self, node_ids: list[str]):
        self.rows: dict[str, _Row] = {n: _Row() for n in node_ids}
        self.llm_calls = 0
        self.tool_calls = 0
        self.tokens = 0

    def feed(self, event: Event) -> None:
        node = getattr(event, "node", None)
        if node is None:
            return
        top, _, rest = node.partition("[")
        top = top.split("/")[0]
        row = self.rows.get(top)
        is_child = bool(rest) or "/" in node
        if isinstance(event, LLMCallFinished):
            self.llm_calls += 1
            self.tokens += event.prompt_tokens + event.completion_tokens
        elif isinstance(event, ToolCallFinished):
            self.tool_calls += 1
        if row is None:
            return
        if isinstance(event, GraphExtended) and event.node == top:
            row.children.update(event.instances)  # map elements, planner tasks
        elif is_child:
            if isinstance(event, NodeFinished | NodeSkipped | NodeFailed) and node in row.children:
                row.children_done += 1
        elif isinstance(event, NodeStarted):
            row.state, row.started, row.attempt = "running", time.perf_counter(), event.attempt
        elif isinstance(event, NodeRetrying):
            row.state, row.note = "retrying", event.error
        elif isinstance(event, NodeFinished):
            row.state, row.duration = "done", event.duration_s
        elif isinstance(event, NodeFailed):
            row.state, row.note = ("failed" if event.policy == "fail" else "done"), event.error
        elif isinstance(event, NodeSkipped):
            row.state, row.note = "skipped", event.reason
        elif isinstance(event, InputRequested):
            row.state, row.note = "waiting", event.prompt
        elif isinstance(event, CacheHit):
            row.note = "cached"

    def __rich__(self) -> Table:
        # rendered anew on every refresh of a `Live` display: running times keep moving
        return self.table()

    def table(self) -> Table:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for col in ("", "node", "time", "detail"):
            table.add_column(col)
        now = time.perf_counter()
        for node, row in self.rows.items():
            mark, style = _STYLE[row.state]
            if row.duration is not None:
                took = f"{row.duration * 1000:.0f} ms"
            elif row.state in ("running", "retrying"):
                took = f"{(now - row.started):.1f} s"
            else:
                took = ""
            detail = row.note
            if row.children:
                items = "item" if len(row.children) == 1 else "items"
                detail = f"{row.children_done}/{len(row.children)} {items} " + detail
            if row.attempt > 1:
                detail = f"attempt {row.attempt} " + detail
            table.add_row(Text(mark, style=style), Text(node, style=style), took, detail[:80])
        return table


def render_result(console: Console, result: RunResult, view: RunView | None) -> None:
    style = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(
        result.status, "magenta"
    )
    parts: list[Any] = []
    if result.error:
        parts.append(Text(result.error, style="red"))
    for request in result.pending:
        parts.append(Text(f"{request.node} asks: {request.prompt}", style="magenta"))
        schema = json.dumps(request.answer_schema, default=str)
        parts.append(Text(f"  answer: {schema}", style="dim"))
    if result.output is not None:
        dumped = (
            result.output.model_dump(mode="json")
            if hasattr(result.output, "model_dump")
            else result.output
        )
        parts.append(Syntax(json.dumps(dumped, indent=2, default=str), "json", word_wrap=True))
    summary = f"{result.duration_s:.2f} s"
    if view is not None:
        summary += (
            f" · {counted(view.llm_calls, 'LLM call')} · {counted(view.tool_calls, 'tool call')}"
            f" · {counted(view.tokens, 'token')}"
        )
    console.print(
        Panel(
            Group(*parts) if parts else Text("(no output)"),
            title=f"[{style}]{result.status}[/] · run {result.run_id}",
            subtitle=summary,
            expand=False,
        )
    )
