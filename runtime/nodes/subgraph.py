"""The `subgraph` node's executor: the child graph runs in the same run, its node instances
named `<node>/<id>`."""

from __future__ import annotations

from typing import Any

from treadle.graphs.kinds import SubgraphNode
from treadle.runtime.nodes.base import NodeCall, NodeExecutor


class SubgraphExecutor(NodeExecutor[SubgraphNode]):
    spec = SubgraphNode
    # its nodes take theirs: holding one as well would deadlock a run whose limit is 1
    takes_slot = False

    async def run(self, call: NodeCall[SubgraphNode]) -> Any:
        assert call.node.child is not None  # compile refuses a subgraph that does not compile
        return await call.scope.run_graph(call.node.child, call.inputs, f"{call.instance}/")


EXECUTOR = SubgraphExecutor()
