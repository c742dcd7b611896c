"""A workflow's DAG as SVG, laid out here (no Graphviz, no JavaScript library).

Layered drawing, the Sugiyama way kept small: each node goes one layer below the deepest
node it reads (longest path from the inputs), nodes in a layer are ordered by the mean
position of their neighbours (a few sweeps down and up, which removes most crossings),
then edges are drawn as curves from the bottom of a node to the top of the next. Every
node is a `<g class="node" data-node="ID">` the page colours by status (`st-running`...).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from html import escape

from treadle.graphs.outline import GraphOutline

NODE_W = 176
NODE_H = 48
GAP_X = 28
GAP_Y = 56
PAD = 16
_SWEEPS = 4
_MAX_LABEL = 24

#: the pseudo-nodes of the graph's inputs and outputs (`graph_edges`)
INPUT, OUTPUT = "__input__", "__output__"


@dataclass(frozen=True)
class Box:
    id: str
    title: str
    subtitle: str
    x: float
    y: float


def _layers(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Longest path from the sources; an edge that closes a cycle is ignored."""
    succ: dict[str, list[str]] = defaultdict(list)
    for src, dst in edges:
        succ[src].append(dst)
    layer = dict.fromkeys(nodes, 0)
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str) -> None:
        stack = [(node, iter(succ[node]))]
        state[node] = 1
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[current] = 2
                order.append(current)
                stack.pop()
            elif state.get(child) is None:
                state[child] = 1
                stack.append((child, iter(succ[child])))

    for node in nodes:
        if node not in state:
            visit(node)
    position = {node: i for i, node in enumerate(reversed(order))}
    for node in reversed(order):  # topological order
        for child in succ[node]:
            if position[child] > position[node]:  # (a back edge closes a cycle)
                layer[child] = max(layer[child], layer[node] + 1)
    if OUTPUT in layer and len(layer) > 1:  # the outputs at the bottom, below every node
        deepest = max(depth for node, depth in layer.items() if node != OUTPUT)
        layer[OUTPUT] = max(layer[OUTPUT], deepest + 1)
    return layer


def _order(layer: dict[str, int], edges: list[tuple[str, str]]) -> list[list[str]]:
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for node, depth in layer.items():
        rows[depth].append(node)
    ups: dict[str, list[str]] = defaultdict(list)
    downs: dict[str, list[str]] = defaultdict(list)
    for src, dst in edges:
        ups[dst].append(src)
        downs[src].append(dst)
    for sweep in range(_SWEEPS):
        down = sweep % 2 == 0
        links = ups if down else downs
        for depth in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            fixed = rows[depth - 1] if down else rows[depth + 1]
            where = {node: i for i, node in enumerate(fixed)}
            now = {node: float(i) for i, node in enumerate(rows[depth])}
            rows[depth].sort(key=lambda node: _centre(links[node], where, now[node]))
    return rows


def _centre(neighbours: list[str], where: dict[str, int], otherwise: float) -> float:
    """The mean position of a node's neighbours in the fixed layer (its own without any)."""
    seen = [where[n] for n in neighbours if n in where]
    return sum(seen) / len(seen) if seen else otherwise


def _short(text: str) -> str:
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def layout(
    spec: GraphOutline,
) -> tuple[list[Box], list[tuple[str, str, bool]], float, float]:
    """Boxes, edges (source, target, is_control) and the drawing's width and height."""
    all_edges = spec.edges
    nodes = [node.id for node in spec.nodes]
    if spec.inputs:
        nodes.insert(0, INPUT)
    if spec.outputs:
        nodes.append(OUTPUT)
    pairs = [(src, dst) for src, dst, _label, _control in all_edges if src != dst]
    layer = _layers(nodes, pairs)
    rows = _order(layer, pairs)
    widest = max((len(row) for row in rows), default=1)
    width = PAD * 2 + widest * NODE_W + (widest - 1) * GAP_X
    height = PAD * 2 + len(rows) * NODE_H + (len(rows) - 1) * GAP_Y
    specs = {node.id: node for node in spec.nodes}
    boxes: list[Box] = []
    for depth, row in enumerate(rows):
        row_w = len(row) * NODE_W + (len(row) - 1) * GAP_X
        left = (width - row_w) / 2
        for i, node_id in enumerate(row):
            x = left + i * (NODE_W + GAP_X)
            y = PAD + depth * (NODE_H + GAP_Y)
            if node_id == INPUT:
                title, subtitle = "inputs", ", ".join(spec.inputs)
            elif node_id == OUTPUT:
                title, subtitle = "outputs", ", ".join(spec.outputs)
            else:
                node = specs[node_id]
                lines = node.label.split("\\n")
                title, subtitle = node_id, " · ".join(lines[1:]) or node.kind
            boxes.append(Box(node_id, _short(title), _short(subtitle), x, y))
    edges = list(dict.fromkeys((src, dst, control) for src, dst, _l, control in all_edges))
    return boxes, edges, width, height


def to_svg(spec: GraphOutline) -> str:
    """The DAG as an inline SVG element (nodes `pending` until the page says otherwise)."""
    boxes, edges, width, height = layout(spec)
    at = {box.id: box for box in boxes}
    parts = [
        f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} '
        f'{height:.0f}" width="{width:.0f}" height="{height:.0f}" role="img" '
        f'aria-label="{escape(spec.name)}: the workflow\'s graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'class="arrowhead"/></marker></defs>',
    ]
    for src, dst, control in edges:
        a, b = at.get(src), at.get(dst)
        if a is None or b is None:
            continue
        x1, y1 = a.x + NODE_W / 2, a.y + NODE_H
        x2, y2 = b.x + NODE_W / 2, b.y
        if y2 <= y1:  # same layer or upwards (a cycle's back edge): go round the side
            x1, y1, x2, y2 = a.x + NODE_W, a.y + NODE_H / 2, b.x + NODE_W, b.y + NODE_H / 2
            bend = f"C{x1 + 40:.0f},{y1:.0f} {x2 + 40:.0f},{y2:.0f}"
        else:
            mid = (y1 + y2) / 2
            bend = f"C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f}"
        css = "edge control" if control else "edge"
        parts.append(
            f'<path class="{css}" data-from="{escape(src)}" data-to="{escape(dst)}" '
            f'd="M{x1:.0f},{y1:.0f} {bend} {x2:.0f},{y2:.0f}" marker-end="url(#arrow)"/>'
        )
    for box in boxes:
        role = "io" if box.id in (INPUT, OUTPUT) else "node st-pending"
        parts.append(
            f'<g class="{role}" data-node="{escape(box.id)}" tabindex="0">'
            f"<title>{escape(box.id)}</title>"
            f'<rect x="{box.x:.0f}" y="{box.y:.0f}" width="{NODE_W}" height="{NODE_H}" '
            'rx="8"/>'
            f'<text x="{box.x + NODE_W / 2:.0f}" y="{box.y + 20:.0f}" class="title">'
            f"{escape(box.title)}</text>"
            f'<text x="{box.x + NODE_W / 2:.0f}" y="{box.y + 37:.0f}" class="sub">'
            f"{escape(box.subtitle)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)
