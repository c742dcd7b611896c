"""Drawing a graph: Mermaid (for Markdown) and Graphviz DOT (and PNG when `dot` exists).

Each kind says how its nodes look (`label`, `mermaid`, `dot`), which bindings they read
(`bindings`) and which nodes they choose to run (`control_edges`)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from treadle.graphs.kinds import kind_of
from treadle.graphs.spec import ERROR, INDEX, INPUT, ITEM, FirstOf, GraphSpec, Ref


@dataclass(frozen=True)
class DynamicNode:
    """A node a run added to its DAG (a planner's task), drawn inside its parent node.

    `deps` are other dynamic nodes' ids; a task without deps hangs off its parent."""

    parent: str
    id: str
    label: str
    deps: tuple[str, ...] = ()


def _edges(spec: GraphSpec) -> Iterator[tuple[str, str, str, bool]]:
    """(source, target, label, is_control) for every edge, graph input and output included."""

    def refs(binding: object) -> Iterator[Ref]:
        if isinstance(binding, Ref):
            yield binding
        elif isinstance(binding, FirstOf):
            yield from binding.refs

    def source(ref: Ref) -> str | None:
        if ref.node in (ITEM, INDEX, ERROR):  # values of the node itself, not edges
            return None
        return "__input__" if ref.node == INPUT else ref.node

    for node in spec.nodes:
        kind = kind_of(node)
        for name, binding in kind.bindings(node):
            for ref in refs(binding):
                src = source(ref)
                if src is not None:
                    field = ".".join(ref.path)
                    yield src, node.id, f"{field}→{name}" if field else name, False
        for label, target in kind.control_edges(node):
            yield node.id, target, label, True
    for name, binding in spec.outputs.items():
        for ref in refs(binding):
            src = source(ref)
            if src is not None:
                yield src, "__output__", name, False


def _mermaid_id(node_id: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in node_id)


def _mermaid_dynamic(extra: Sequence[DynamicNode]) -> list[str]:
    lines: list[str] = []
    parents = dict.fromkeys(d.parent for d in extra)
    for parent in parents:
        lines.append(f'  subgraph {_mermaid_id(parent)}__run["{parent}: run-time tasks"]')
        lines += [f'    {_mermaid_id(d.id)}["{d.label}"]' for d in extra if d.parent == parent]
        lines.append("  end")
    for d in extra:
        for dep in d.deps or (d.parent,):
            lines.append(f"  {_mermaid_id(dep)} -.-> {_mermaid_id(d.id)}")
    return lines


def to_mermaid(spec: GraphSpec, extra: Sequence[DynamicNode] = ()) -> str:
    lines = ["flowchart TD"]
    if spec.inputs:
        lines.append(f'  __input__(["inputs: {", ".join(spec.inputs)}"])')
    for node in spec.nodes:
        kind = kind_of(node)
        text = kind.label(node).replace("\\n", "<br/>")
        opening, closing = kind.mermaid
        lines.append(f"  {_mermaid_id(node.id)}{opening}{text}{closing}")
    if spec.outputs:
        lines.append(f'  __output__(["outputs: {", ".join(spec.outputs)}"])')
    for src, dst, label, control in _edges(spec):
        arrow = "-.->" if control else "-->"
        lines.append(f'  {_mermaid_id(src)} {arrow}|"{label}"| {_mermaid_id(dst)}')
    lines += _mermaid_dynamic(extra)
    return "\n".join(lines) + "\n"


def to_dot(spec: GraphSpec, extra: Sequence[DynamicNode] = ()) -> str:
    lines = [
        f'digraph "{spec.name}" {{',
        "  rankdir=TB;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=8];',
    ]
    if spec.inputs:
        lines.append(f'  "__input__" [label="inputs\\n{", ".join(spec.inputs)}", shape=invhouse];')
    for node in spec.nodes:
        kind = kind_of(node)
        lines.append(f'  "{node.id}" [label="{kind.label(node)}", {kind.dot}];')
    if spec.outputs:
        lines.append(f'  "__output__" [label="outputs\\n{", ".join(spec.outputs)}", shape=house];')
    for src, dst, label, control in _edges(spec):
        style = ", style=dashed" if control else ""
        lines.append(f'  "{src}" -> "{dst}" [label="{label}"{style}];')
    for parent in dict.fromkeys(d.parent for d in extra):
        lines.append(f'  subgraph "cluster_{parent}" {{')
        lines.append(f'    label="{parent}: run-time tasks"; style=dotted;')
        lines += [
            f'    "{d.id}" [label="{d.label}", shape=box];' for d in extra if d.parent == parent
        ]
        lines.append("  }")
    for d in extra:
        for dep in d.deps or (d.parent,):
            lines.append(f'  "{dep}" -> "{d.id}" [style=dotted];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_png(spec: GraphSpec, path: Path, extra: Sequence[DynamicNode] = ()) -> None:
    """Render with Graphviz's `dot`; raises RuntimeError if Graphviz is not installed."""
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError("Graphviz is not installed (no `dot` on PATH); use --format dot")
    source = to_dot(spec, extra).encode()
    subprocess.run([dot, "-Tpng", "-o", str(path)], input=source, check=True)
