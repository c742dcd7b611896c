"""The `map` node's executor: one instance of the inner node per element of `over`
(`m[0]`, `m[1]`, ...), at most `concurrency` at once, each under the inner node's own
options and journaled on its own (a retry or a resumed run reuses the finished ones); the
outputs in order, skipped elements left out, folded by `reduce` when given."""

from __future__ import annotations

import inspect
from typing import Any

import anyio

from treadle.graphs.kinds import MapNode
from treadle.runtime.core.events import GraphExtended
from treadle.runtime.nodes.base import NodeCall, NodeExecutor, Skipped


class MapExecutor(NodeExecutor[MapNode]):
    spec = MapNode
    takes_slot = False  # its elements take theirs

    async def run(self, call: NodeCall[MapNode]) -> Any:
        spec, scope, inner = call.spec, call.scope, call.node.inner
        assert inner is not None  # compile refuses a map without an inner node
        items = list(scope.evaluate(spec.over))
        instances = [f"{call.instance}[{i}]" for i in range(len(items))]
        call.ctx.emit(GraphExtended, node=call.instance, instances=instances)
        results: list[Any] = [None] * len(items)
        limit = spec.options.concurrency
        limiter = anyio.CapacityLimiter(limit) if limit else None

        async def one(i: int) -> None:
            if limiter is not None:
                async with limiter:
                    results[i] = await scope.run_element(inner, instances[i], items[i])
            else:
                results[i] = await scope.run_element(inner, instances[i], items[i])

        if scope.runs_inline(inner):
            for i in range(len(items)):
                await one(i)
        else:
            async with anyio.create_task_group() as tg:
                for i in range(len(items)):
                    tg.start_soon(one, i, name=instances[i])
        collected = [r for r in results if not isinstance(r, Skipped)]
        if spec.reduce is None:
            return collected
        reduced = spec.reduce(collected)
        return await reduced if inspect.isawaitable(reduced) else reduced


EXECUTOR = MapExecutor()
