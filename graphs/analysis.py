"""Static analysis: the facts about a program that the scheduler and pinning policy use.

For every LLM node: how many LLM steps are still ahead of it on the longest path (0 means
it is the program's last LLM step on every path through it — pinning its KV after it is
useless), which tools follow it, and which other nodes share its prompt prefix. For the
graph: the critical path by estimated cost, and every node's remaining cost to the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from treadle.graphs.spec import LLMNode, MapNode, NodeSpec, PlannerNode, SubgraphNode, ToolNode

if TYPE_CHECKING:
    from treadle.graphs.compile import CompiledNode

#: cost estimates (seconds) used before any measurement exists
LLM_STEP_COST_S = 1.0
TOOL_COST_S = 0.5
FUNC_COST_S = 0.001


@dataclass(frozen=True)
class LLMFacts:
    node: str
    #: LLM steps after this node on the longest path through it (0: last LLM step)
    steps_to_execution: int
    is_last_llm_step: bool
    #: tools the program calls right after this step (its own tools, or tool nodes next)
    next_tools: tuple[str, ...]
    #: nodes whose prompts start the same way (same model, system prompt, template head)
    prefix_group: str


@dataclass
class GraphFacts:
    llm: dict[str, LLMFacts] = field(default_factory=dict)
    critical_path: tuple[str, ...] = ()
    critical_path_cost_s: float = 0.0
    #: estimated cost from the start of each node to the end of the program
    remaining_cost_s: dict[str, float] = field(default_factory=dict)
    prefix_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


def node_cost_s(spec: NodeSpec) -> float:
    if isinstance(spec, LLMNode):
        return LLM_STEP_COST_S
    if isinstance(spec, PlannerNode):
        return 2 * LLM_STEP_COST_S + TOOL_COST_S  # plan, its tasks, join
    if isinstance(spec, ToolNode):
        expected = spec.tool.expected_duration_s if spec.tool is not None else None
        return expected if expected is not None else TOOL_COST_S
    if isinstance(spec, MapNode):
        return node_cost_s(spec.node) if spec.node is not None else FUNC_COST_S
    if isinstance(spec, SubgraphNode):
        return LLM_STEP_COST_S * _count_llm(spec) + FUNC_COST_S
    return FUNC_COST_S


def llm_steps(spec: NodeSpec) -> int:
    """LLM steps a node itself contributes on a path (a map counts once: it is parallel)."""
    if isinstance(spec, LLMNode):
        return 1
    if isinstance(spec, PlannerNode):
        return 2
    if isinstance(spec, MapNode) and spec.node is not None:
        return llm_steps(spec.node)
    if isinstance(spec, SubgraphNode):
        return _count_llm(spec)
    return 0


def _count_llm(spec: SubgraphNode) -> int:
    if spec.graph is None:
        return 0
    return sum(llm_steps(n) for n in spec.graph.nodes)


def _llm_spec(spec: NodeSpec) -> LLMNode | PlannerNode | None:
    if isinstance(spec, LLMNode | PlannerNode):
        return spec
    if isinstance(spec, MapNode) and isinstance(spec.node, LLMNode | PlannerNode):
        return spec.node
    return None


def _tool_names(spec: NodeSpec) -> tuple[str, ...]:
    if isinstance(spec, ToolNode) and spec.tool is not None:
        return (spec.tool.name,)
    if isinstance(spec, MapNode) and spec.node is not None:
        return _tool_names(spec.node)
    return ()


def prefix_key(spec: LLMNode | PlannerNode) -> str:
    head = spec.prompt.split("{", 1)[0]
    raw = "\x00".join((spec.model, spec.system or "", head))
    return hashlib.blake2b(raw.encode(), digest_size=6).hexdigest()


def analyze(nodes: Mapping[str, CompiledNode]) -> GraphFacts:
    """Compute the facts for nodes given in topological order."""
    facts = GraphFacts()
    order = list(nodes)
    remaining: dict[str, float] = {}
    best_next: dict[str, str | None] = {}
    steps_after: dict[str, int] = {}
    for nid in reversed(order):
        node = nodes[nid]
        after_cost, nxt, after_steps = 0.0, None, 0
        for child in node.dependents:
            if remaining[child] > after_cost:
                after_cost, nxt = remaining[child], child
            after_steps = max(after_steps, steps_after[child] + llm_steps(nodes[child].spec))
        remaining[nid] = node_cost_s(node.spec) + after_cost
        best_next[nid] = nxt
        steps_after[nid] = after_steps
    facts.remaining_cost_s = remaining

    if order:
        start = max((n for n in order if not nodes[n].deps), key=lambda n: remaining[n])
        path = [start]
        while (nxt := best_next[path[-1]]) is not None:
            path.append(nxt)
        facts.critical_path = tuple(path)
        facts.critical_path_cost_s = remaining[start]

    groups: dict[str, list[str]] = {}
    for nid in order:
        spec = _llm_spec(nodes[nid].spec)
        if spec is None:
            continue
        key = prefix_key(spec)
        groups.setdefault(key, []).append(nid)
        own_tools = tuple(t.name for t in spec.tools)
        following = tuple(
            t for child in nodes[nid].dependents for t in _tool_names(nodes[child].spec)
        )
        facts.llm[nid] = LLMFacts(
            node=nid,
            steps_to_execution=steps_after[nid],
            is_last_llm_step=steps_after[nid] == 0,
            next_tools=tuple(dict.fromkeys(own_tools + following)),
            prefix_group=key,
        )
    facts.prefix_groups = {k: tuple(v) for k, v in groups.items()}
    return facts
