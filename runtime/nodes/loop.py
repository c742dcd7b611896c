"""The `loop` node's executor: iteration after iteration of the body graph, each one
journaled as instance `<node>[i]` once it has finished (its nodes are `<node>[i]/<id>`),
so a resumed run reloads the finished iterations instead of running them again. After
the loop, the run's iteration count refines the graph's expectation of it
(`treadle.graphs.analysis.observe_iterations`)."""

from __future__ import annotations

import time
from typing import Any

from treadle.graphs.analysis import observe_iterations
from treadle.graphs.kinds import LoopNode, condition_met
from treadle.runtime.core.events import GraphExtended, NodeFinished, NodeStarted
from treadle.runtime.core.values import dump_value, get_path, load_value
from treadle.runtime.nodes.base import NodeCall, NodeExecutor


class LoopExecutor(NodeExecutor[LoopNode]):
    spec = LoopNode
    takes_slot = False  # the body's nodes take theirs

    async def run(self, call: NodeCall[LoopNode]) -> Any:
        ctx, spec, child = call.ctx, call.spec, call.node.child
        assert child is not None  # compile refuses a loop whose body does not compile
        inputs = dict(call.inputs)
        outputs: list[Any] = []
        for i in range(spec.max_iterations):
            instance = f"{call.instance}[{i}]"
            data = ctx.restored.get(instance)
            if data is not None:
                output = load_value(child.output_type, data)
            else:
                ctx.emit(GraphExtended, node=call.instance, instances=[instance])
                ctx.emit(NodeStarted, node=instance)
                started = time.perf_counter()
                output = await call.scope.run_graph(child, inputs, f"{instance}/")
                data = dump_value(child.output_type, output)
                ctx.emit(NodeFinished, node=instance, duration_s=time.perf_counter() - started)
                await ctx.journal.commit(instance, data)
                ctx.restored[instance] = data  # a retry of the loop node reuses it
            outputs.append(output)
            if condition_met(spec, output):
                break
            for name, source in spec.carry.items():
                inputs[name] = get_path(output, tuple(source.split("."))) if source else output
        graph = call.scope.graph
        if graph.nodes.get(call.node.id) is call.node:  # (not a map's inner loop)
            observe_iterations(graph, call.node.id, len(outputs))
        return outputs if spec.collect == "all" else outputs[-1]


EXECUTOR = LoopExecutor()
