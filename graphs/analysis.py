"""Static analysis: the facts about a program that the scheduler and pinning policy use.

For every LLM node: how many LLM steps are still ahead of it on the longest path (0 means
it is the program's last LLM step on every path through it — pinning its KV after it is
useless), which tools follow it, whether a person is asked right after it (the program
then waits unboundedly: nothing should be held for it), and which other nodes share its
prompt prefix. For the
graph: the critical path by estimated cost, and every node's remaining cost to the end.
What each kind contributes (its cost, its LLM steps, its prompt, the tools it calls) is
said by the kind (`treadle.graphs.kinds`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

from treadle.graphs.compiled import CompiledGraph, CompiledNode, GraphFacts, LLMFacts
from treadle.graphs.kinds import kind_of
from treadle.graphs.kinds.ask import AskNode
from treadle.graphs.kinds.base import (
    FUNC_COST_S,
    LLM_STEP_COST_S,
    TOOL_COST_S,
    Prompted,
)
from treadle.graphs.kinds.loop import LOOP, LoopNode
from treadle.graphs.spec import NodeSpec

__all__ = [
    "FUNC_COST_S",
    "LLM_STEP_COST_S",
    "TOOL_COST_S",
    "GraphFacts",
    "LLMFacts",
    "analyze",
    "llm_steps",
    "node_cost_s",
    "observe_iterations",
    "prefix_key",
]

#: how much one run's iteration count moves a loop's expectation (an exponential average)
ITERATIONS_WEIGHT = 0.2


def node_cost_s(spec: NodeSpec) -> float:
    return kind_of(spec).cost_s(spec)


def llm_steps(spec: NodeSpec) -> int:
    """LLM steps a node itself contributes on a path (a map counts once: it is parallel)."""
    return kind_of(spec).llm_steps(spec)


def prefix_key(spec: Prompted) -> str:
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
        node_spec = nodes[nid].spec
        spec = kind_of(node_spec).prompted(node_spec)
        if spec is None:
            continue
        key = prefix_key(spec)
        groups.setdefault(key, []).append(nid)
        own_tools = tuple(t.name for t in spec.tools)
        following = tuple(
            t
            for child in nodes[nid].dependents
            for t in kind_of(nodes[child].spec).tools_called(nodes[child].spec)
        )
        dependents = nodes[nid].dependents
        facts.llm[nid] = LLMFacts(
            node=nid,
            steps_to_execution=steps_after[nid],
            is_last_llm_step=steps_after[nid] == 0,
            next_tools=tuple(dict.fromkeys(own_tools + following)),
            prefix_group=key,
            human_wait_next=bool(dependents)
            and all(isinstance(nodes[child].spec, AskNode) for child in dependents),
        )
    facts.prefix_groups = {k: tuple(v) for k, v in groups.items()}
    return facts


def observe_iterations(cg: CompiledGraph, node_id: str, iterations: int) -> float:
    """A run of loop `node_id` of `cg` took `iterations`: refine the loop's expected
    iterations (an exponential average over runs, starting from its declared hint) and
    the facts that depend on it, in place (`GraphFacts.update`): the graph's critical
    path and remaining costs, and the body's LLM steps ahead. Returns the new expectation.
    """
    history: dict[str, float] = cg.__dict__.setdefault("_iterations", {})
    node = cg.nodes[node_id]
    assert isinstance(node.spec, LoopNode)
    before = history.get(node_id, node.spec.expected)
    expected = before + ITERATIONS_WEIGHT * (iterations - before)
    history[node_id] = expected
    nodes = {
        nid: _with_expected(cn, history[nid]) if nid in history else cn
        for nid, cn in cg.nodes.items()
    }
    cg.facts.update(analyze(nodes))
    refined = nodes[node_id].spec
    assert isinstance(refined, LoopNode)
    if node.child is not None:
        body = analyze(node.child.nodes)
        body.repeat(LOOP.more_steps(refined, node.child))
        node.child.facts.update(body)
    return expected


def _with_expected(cn: CompiledNode, expected: float) -> CompiledNode:
    spec = cn.spec
    assert isinstance(spec, LoopNode)
    return dataclasses.replace(cn, spec=dataclasses.replace(spec, expected_iterations=expected))
