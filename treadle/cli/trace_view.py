"""`treadle trace`: a run's timeline drawn as a terminal waterfall (rich), or as JSON.

Each row is a node instance, an LLM call, a tool call or a KV pin, indented under the node
that holds it; its bar is placed on the run's time axis, one character cell per
`duration / width` seconds, with a glyph and colour per segment kind (see `LEGEND`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from treadle.runtime.core.events import Event
from treadle.runtime.observe.metrics import counted
from treadle.runtime.observe.timeline import Row, Timeline, build_timeline

#: segment kind → (glyph, style)
GLYPHS: dict[str, tuple[str, str]] = {
    "wait": ("░", "bright_black"),
    "attempt": ("█", "green"),
    "failed": ("█", "red"),
    "backoff": ("╌", "yellow"),
    "queue": ("░", "magenta"),
    "prefill": ("▓", "blue"),
    "decode": ("█", "blue"),
    "call": ("█", "blue"),
    "tool": ("█", "yellow"),
    "error": ("█", "red"),
    "pin": ("═", "cyan"),
}

LEGEND = (
    ("attempt", "node"),
    ("failed", "failed"),
    ("backoff", "retry backoff"),
    ("wait", "ready, waiting"),
    ("queue", "LLM queue"),
    ("prefill", "prefill (to 1st token)"),
    ("decode", "decode"),
    ("call", "LLM call"),
    ("tool", "tool"),
    ("pin", "KV pin"),
)

_STATUS = {
    "done": ("✓", "green"),
    "ok": ("✓", "green"),
    "fallback": ("✓", "yellow"),
    "running": ("▶", "yellow"),
    "held": ("▶", "cyan"),
    "released": ("✓", "cyan"),
    "failed": ("✗", "red"),
    "error": ("✗", "red"),
    "skipped": ("−", "bright_black"),
}
_RUN_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}

#: segments drawn at least one cell wide however short: the work itself (waits, queues,
#: backoffs and pins shorter than a cell may vanish under it)
_ALWAYS_SHOWN = frozenset({"attempt", "failed", "call", "decode", "tool", "error"})

#: map elements / planner tasks shown per node before the rest are folded into one line
MAX_CHILDREN = 50


def trace_command(events: Sequence[Event], *, as_json: bool, console: Console) -> None:
    """What `treadle trace RUN_ID` prints: the waterfall, or with `as_json` the timeline
    model as JSON on the console's file (ValueError when there are no events)."""
    timeline = build_timeline(events)
    if as_json:
        console.file.write(json.dumps(timeline.to_dict(), indent=2, default=str) + "\n")
        console.file.flush()
        return
    console.print(render_timeline(timeline, width=console.width))


def render_timeline(timeline: Timeline, *, width: int = 120) -> RenderableType:
    """The waterfall of `timeline` for a terminal `width` columns wide."""
    rows = _fold(timeline.rows)
    name_width = min(40, max([len(_name(r)) for r in rows if isinstance(r, Row)] + [4]))
    # fixed columns: mark 1, name, start 8, took 8, and 2 cells between columns; the bar
    # gets about 55% of the rest, the detail column what remains
    fixed = 1 + name_width + 8 + 8 + 2 * 5
    bar_width = max(20, min(100, int((width - fixed) * 0.55)))
    detail_width = max(10, width - fixed - bar_width)
    scale = bar_width / timeline.duration_s if timeline.duration_s > 0 else 0.0
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("", width=1, no_wrap=True)
    table.add_column("name", width=name_width, no_wrap=True, overflow="ellipsis")
    table.add_column("start", width=8, justify="right", no_wrap=True)
    table.add_column("took", width=8, justify="right", no_wrap=True)
    table.add_column(_axis(timeline.duration_s, bar_width), width=bar_width, no_wrap=True)
    table.add_column("detail", width=detail_width, no_wrap=True, overflow="ellipsis")
    for row in rows:
        if isinstance(row, _Folded):
            table.add_row(
                "", Text(row.indent + "…", style="bright_black"), "", "",
                Text(row.text, style="bright_black"), "",
            )  # fmt: skip
            continue
        mark, style = _STATUS.get(row.status, ("·", ""))
        table.add_row(
            Text(mark, style=style),
            Text(_name(row), style="bold" if row.depth == 0 and row.kind == "node" else ""),
            _fmt_s(row.start_s),
            _took(row),
            _bar(row, scale, bar_width),
            _detail(row),
        )
    return Group(_header(timeline), table, _legend(), *_summary(timeline))


def _header(timeline: Timeline) -> Text:
    status = timeline.status or "unfinished"
    text = Text.assemble(
        ("run ", "bold"),
        (timeline.run_id, "bold"),
        f" · {timeline.graph or '?'} · ",
        (status, _RUN_STYLE.get(status, "yellow")),
        f" · {_fmt_s(timeline.duration_s)}",
    )
    resumes = sum(1 for m in timeline.markers if m.kind == "resumed")
    if resumes:
        text.append(f" · resumed {resumes}×")
    if timeline.error:
        text.append(f"\n{timeline.error}", style="red")
    return text


def _summary(timeline: Timeline) -> list[Text]:
    return [Text(line, style="bright_black") for line in timeline.summary.lines()]


def _legend() -> Text:
    text = Text()
    for kind, label in LEGEND:
        glyph, style = GLYPHS[kind]
        text.append(glyph * 2, style=style)
        text.append(f" {label}  ")
    return text


def _axis(duration: float, width: int) -> str:
    left = "0"
    right = _fmt_s(duration)
    return left + " " * max(1, width - len(left) - len(right)) + right


def _name(row: Row) -> str:
    indent = "  " * row.depth
    if row.kind == "node":
        label = row.id.rsplit("/", 1)[-1] if row.depth else row.id
        if row.attempts > 1:
            label += f" ×{row.attempts}"
        return indent + label
    return indent + row.label


def _bar(row: Row, scale: float, width: int) -> Text:
    cells: list[tuple[str, str]] = [(" ", "")] * width
    if scale <= 0:
        return Text("█", style=GLYPHS["attempt"][1])
    # the work itself is drawn last, over the waits around it
    ordered = sorted(row.segments, key=lambda seg: seg.kind in _ALWAYS_SHOWN)
    for seg in ordered:
        glyph, style = GLYPHS.get(seg.kind, ("█", ""))
        lo = min(width - 1, max(0, round(seg.start_s * scale)))
        hi = min(width, round(seg.end_s * scale))
        if seg.kind in _ALWAYS_SHOWN:
            hi = max(hi, lo + 1)
        for i in range(lo, hi):
            cells[i] = (glyph, style)
    if all(glyph == " " for glyph, _ in cells):
        # shorter than a cell (a wait, a queue) or an instant (a skipped node)
        at = min(width - 1, max(0, round(row.start_s * scale)))
        cells[at] = ("·" if row.status == "skipped" else "▏", "bright_black")
    text = Text()
    for glyph, style in cells:
        text.append(glyph, style=style)
    return text


def _detail(row: Row) -> str:
    d = row.detail
    if row.kind == "llm":
        parts = []
        if "input_tokens" in d:
            parts.append(f"{d['input_tokens']}→{d['output_tokens']} tok")
            if d.get("cached_tokens"):
                parts.append(f"{d['cached_tokens']} cached")
        if d.get("queue_wait_s", 0.0) >= 0.001:
            parts.append(f"queue {_fmt_s(d['queue_wait_s'])}")
        if d.get("ttft_s") is not None:
            parts.append(f"ttft {_fmt_s(d['ttft_s'])}")
        if d.get("replica"):
            parts.append(f"@{d['replica']}")
        if d.get("tool_calls"):
            parts.append(counted(d["tool_calls"], "tool call"))
        if d.get("error"):
            parts.append(str(d["error"]))
        return " · ".join(parts)
    if row.kind == "pin":
        parts = [f"ttl {_fmt_s(d['ttl_s'])}"]
        if d.get("tokens"):
            parts.append(f"{d['tokens']} tok")
        if "used" in d:
            parts.append(("used" if d["used"] else "unused") + f" ({d['reason']})")
        return " · ".join(parts)
    for key in ("error", "reason"):
        if d.get(key):
            return str(d[key])
    if d.get("errors"):
        return f"retried: {d['errors'][-1]}"
    return ""


class _Folded:
    """A line standing for the child nodes left out under one parent."""

    def __init__(self, indent: str, text: str) -> None:
        self.indent = indent
        self.text = text


def _fold(rows: list[Row]) -> list[Row | _Folded]:
    """At most MAX_CHILDREN child nodes per node (map elements, planner tasks), each with
    everything under it; the rest become one line saying how many were left out."""
    children: dict[str | None, list[Row]] = {}
    for row in rows:  # already in tree order
        children.setdefault(row.parent, []).append(row)
    out: list[Row | _Folded] = []

    def visit(parent: str | None, depth: int) -> None:
        nodes = hidden = 0
        for row in children.get(parent, ()):
            if row.kind == "node" and parent is not None:
                nodes += 1
                if nodes > MAX_CHILDREN:
                    hidden += 1
                    continue
            out.append(row)
            if row.kind == "node":
                visit(row.id, depth + 1)
        if hidden:
            out.append(_Folded("  " * depth, f"{hidden} more under {parent}"))

    visit(None, 0)
    return out


def _took(row: Row) -> str:
    took = row.duration_s
    if took is None:
        return "…"  # still open when the journal ends
    if row.status == "skipped" and not row.segments:
        return ""  # decided, never run
    return _fmt_s(took)


def _fmt_s(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 100:
        return f"{seconds:.2f} s"
    return f"{seconds:.0f} s"
