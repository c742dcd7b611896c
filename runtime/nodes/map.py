"""The `map` node's executor: one instance of the inner node per element of `over`
(`m[0]`, `m[1]`, ...), at most `concurrency` at once, each under the inner node's own
options and journaled on its own (a retry or a resumed run reuses the finished ones); the
outputs in order, skipped elements left out, folded by `reduce` when given.

With `max_failures`, an element that fails is recorded as its error instead of failing the
map, until more than `max_failures` have failed. Elements that wait for human input let
the others finish; then the map waits (`InputPending`) with all their requests."""

from __future__ import annotations

import inspect
from typing import Any

import anyio

from treadle.graphs.kinds import ElementResult, MapNode
from treadle.runtime.core.errors import RunFailed, error_info
from treadle.runtime.core.events import GraphExtended
from treadle.runtime.core.waiting import InputPending
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
        failed: list[RunFailed] = []
        waiting: dict[int, InputPending] = {}
        limit = spec.options.concurrency
        limiter = anyio.CapacityLimiter(limit) if limit else None

        async def element(i: int) -> None:
            try:
                results[i] = await scope.run_element(inner, instances[i], items[i], i)
            except InputPending as pending:
                results[i] = Skipped("waiting for input")
                waiting[i] = pending
            except RunFailed as failure:
                if spec.max_failures is None:
                    raise
                results[i] = failure
                failed.append(failure)
                if len(failed) > spec.max_failures:
                    raise RunFailed.at_node(
                        call.ctx.run_id,
                        call.instance,
                        f"{len(failed)} elements failed (max_failures {spec.max_failures}); "
                        f"the last: {failure.node}: {failure.reason}",
                    ) from None

        async def one(i: int) -> None:
            if limiter is not None:
                async with limiter:
                    await element(i)
            else:
                await element(i)

        if scope.runs_inline(inner):
            for i in range(len(items)):
                await one(i)
        else:
            async with anyio.create_task_group() as tg:
                for i in range(len(items)):
                    tg.start_soon(one, i, name=instances[i])
        if waiting:
            raise InputPending.merge([waiting[i] for i in sorted(waiting)])
        collected: list[Any]
        if spec.max_failures is None:
            collected = [r for r in results if not isinstance(r, Skipped)]
        else:
            collected = [
                ElementResult(index=i, error=error_info(r, instances[i], 1))
                if isinstance(r, RunFailed)
                else ElementResult(index=i, value=r)
                for i, r in enumerate(results)
                if not isinstance(r, Skipped)
            ]
        if spec.reduce is None:
            return collected
        reduced = spec.reduce(collected)
        return await reduced if inspect.isawaitable(reduced) else reduced


EXECUTOR = MapExecutor()
