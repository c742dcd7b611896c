"""The node kinds, one module each (see `base` for what a kind defines), and the one list
of them: `KINDS` (in the order the file format and its messages list them), the SDK's
node methods (`KindMethods` for `Graph`, `KindSteps` for `step`), and `NODE_KINDS` (name
-> spec class).

Adding a kind: write `graphs/kinds/<name>.py` (spec, SDK methods, `NodeKind`), add it to
the three lists below, and write its executor, `runtime/nodes/<name>.py`.
"""

from __future__ import annotations

from typing import Any

from treadle.graphs.kinds.ask import ASK, AskMethods, AskNode, AskSteps
from treadle.graphs.kinds.base import Imported, NodeKind, graph_imports, kind_of, register
from treadle.graphs.kinds.branch import BRANCH, BranchMethods, BranchNode, route_label
from treadle.graphs.kinds.func import FUNC, FuncMethods, FuncNode, FuncSteps
from treadle.graphs.kinds.llm import LLM, LLMMethods, LLMNode, LLMSteps
from treadle.graphs.kinds.loop import LOOP, LoopMethods, LoopNode, condition_met
from treadle.graphs.kinds.map import MAP, ElementResult, MapMethods, MapNode
from treadle.graphs.kinds.planner import PLANNER, PlannerMethods, PlannerNode, PlannerSteps
from treadle.graphs.kinds.race import RACE, RaceMethods, RaceNode
from treadle.graphs.kinds.subgraph import SUBGRAPH, SubgraphMethods, SubgraphNode, SubgraphSteps
from treadle.graphs.kinds.tool import TOOL, ToolMethods, ToolNode, ToolSteps
from treadle.graphs.spec import NodeSpec

KINDS: tuple[NodeKind[Any], ...] = register(
    FUNC, TOOL, LLM, MAP, BRANCH, SUBGRAPH, PLANNER, ASK, LOOP, RACE
)


class KindMethods(
    FuncMethods,
    ToolMethods,
    LLMMethods,
    PlannerMethods,
    MapMethods,
    BranchMethods,
    SubgraphMethods,
    AskMethods,
    LoopMethods,
    RaceMethods,
):
    """Every kind's `Graph` method (`g.func`, `g.llm`, `g.map`, ...)."""


class KindSteps(FuncSteps, ToolSteps, LLMSteps, PlannerSteps, SubgraphSteps, AskSteps):
    """Every kind's node built without a graph (`step.tool`, ...), e.g. a map's inner one."""


#: kind name -> spec class
NODE_KINDS: dict[str, type[NodeSpec]] = {kind.name: kind.spec for kind in KINDS}

__all__ = [
    "KINDS",
    "NODE_KINDS",
    "AskNode",
    "BranchNode",
    "ElementResult",
    "FuncNode",
    "Imported",
    "KindMethods",
    "KindSteps",
    "LLMNode",
    "LoopNode",
    "MapNode",
    "NodeKind",
    "PlannerNode",
    "RaceNode",
    "SubgraphNode",
    "ToolNode",
    "condition_met",
    "graph_imports",
    "kind_of",
    "route_label",
]
