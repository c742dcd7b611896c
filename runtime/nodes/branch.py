"""The `branch` node's executor: compute the label (`route(**inputs)`, or the single input's
value), fall back to `default` when no route has it, and fail when there is none. The
orchestrator skips the nodes of the routes not chosen (`CompiledNode.guards`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from treadle.graphs.kinds import BranchNode, route_label
from treadle.runtime.core.errors import NodeError
from treadle.runtime.nodes.base import NodeCall, NodeExecutor


def choose(spec: BranchNode, **inputs: Any) -> str:
    raw = spec.route(**inputs) if spec.route is not None else next(iter(inputs.values()))
    label = route_label(raw)
    if label in spec.routes:
        return label
    if spec.default is not None:
        return spec.default
    # the branch fails, not the targets it would skip: they never ran (an "if" with nothing
    # to do on one side lists that label with no targets)
    routes = ", ".join(spec.routes) or "none"
    raise NodeError(
        spec.id,
        f"no route for {label!r} (routes: {routes}) and no default",
        retryable=False,
    )


class BranchExecutor(NodeExecutor[BranchNode]):
    spec = BranchNode

    def inline(self, spec: BranchNode) -> Callable[..., Any] | None:
        return partial(choose, spec)

    async def run(self, call: NodeCall[BranchNode]) -> Any:
        return choose(call.spec, **call.inputs)


EXECUTOR = BranchExecutor()
