"""The `branch` node's executor: compute the label (`route(**inputs)`, or the single input's
value), fall back to `default` when no route has it. The orchestrator skips the nodes of
the routes not chosen (`CompiledNode.guards`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from treadle.graphs.kinds import BranchNode, route_label
from treadle.runtime.nodes.base import NodeCall, NodeExecutor


def choose(spec: BranchNode, **inputs: Any) -> str:
    raw = spec.route(**inputs) if spec.route is not None else next(iter(inputs.values()))
    label = route_label(raw)
    if label not in spec.routes and spec.default is not None:
        return spec.default
    return label


class BranchExecutor(NodeExecutor[BranchNode]):
    spec = BranchNode

    def inline(self, spec: BranchNode) -> Callable[..., Any] | None:
        return partial(choose, spec)

    async def run(self, call: NodeCall[BranchNode]) -> Any:
        return choose(call.spec, **call.inputs)


EXECUTOR = BranchExecutor()
