"""The `func` node's executor: call the function. A quick synchronous one runs inline, in
the task that readied it; a coroutine function is awaited; a `blocking` one runs in a
worker thread."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio.to_thread

from treadle.graphs.kinds import FuncNode
from treadle.runtime.nodes.base import NodeCall, NodeExecutor


class FuncExecutor(NodeExecutor[FuncNode]):
    spec = FuncNode

    def inline(self, spec: FuncNode) -> Callable[..., Any] | None:
        if spec.blocking or inspect.iscoroutinefunction(spec.fn):
            return None
        return spec.fn

    async def run(self, call: NodeCall[FuncNode]) -> Any:
        fn = call.spec.fn
        if inspect.iscoroutinefunction(fn):
            return await fn(**call.inputs)
        if call.spec.blocking:
            # on cancellation the thread is left to finish on its own: the node is not
            # recorded, so it runs again on resume (at-least-once), and Ctrl-C is prompt
            return await anyio.to_thread.run_sync(
                partial(fn, **call.inputs), abandon_on_cancel=True
            )
        return fn(**call.inputs)


EXECUTOR = FuncExecutor()
