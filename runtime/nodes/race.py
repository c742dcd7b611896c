"""The `race` node's executor: every branch starts at once (instance `<race>/<branch>`);
the first to finish wins and the others are cancelled: their cleanup runs, their LLM calls
are aborted (the request is closed, which aborts it on the server), and whatever the
admission holds for them (a KV pin) is released. A branch that fails or is skipped drops
out; the race fails when all have. Branches that wait for human input wait only while no
other has won."""

from __future__ import annotations

from typing import Any

import anyio

from treadle.graphs.kinds import RaceNode
from treadle.runtime.core.errors import RunFailed
from treadle.runtime.core.events import NodeSkipped
from treadle.runtime.core.waiting import InputPending
from treadle.runtime.nodes.base import NodeCall, NodeExecutor, Skipped


class RaceExecutor(NodeExecutor[RaceNode]):
    spec = RaceNode
    takes_slot = False  # its branches take theirs

    async def run(self, call: NodeCall[RaceNode]) -> Any:
        ctx, scope, branches = call.ctx, call.scope, call.node.nested
        won: list[tuple[str, Any]] = []
        dropped: dict[str, str] = {}
        waiting: list[InputPending] = []

        async def branch(name: str) -> None:
            try:
                output = await scope.run_element(branches[name], f"{call.instance}/{name}")
            except InputPending as pending:
                waiting.append(pending)
                return
            except RunFailed as failure:
                dropped[name] = failure.reason
                return
            if isinstance(output, Skipped):
                dropped[name] = output.reason
            elif not won:
                won.append((name, output))
                tg.cancel_scope.cancel()  # the others lose: cancelled, cleanup and all

        async with anyio.create_task_group() as tg:
            for name in branches:
                tg.start_soon(branch, name, name=f"{call.instance}/{name}")
        if not won:
            if waiting:
                raise InputPending.merge(waiting)
            why = "; ".join(f"{name}: {reason}" for name, reason in dropped.items())
            raise RunFailed.at_node(ctx.run_id, call.instance, f"every branch failed ({why})")
        winner, output = won[0]
        for name in branches:
            if name != winner and name not in dropped:
                loser = f"{call.instance}/{name}"
                ctx.emit(NodeSkipped, node=loser, reason=f"cancelled: branch {winner!r} won")
                if ctx.admission is not None:
                    ctx.admission.end_node(ctx, loser, "cancelled")
        return call.node.output_type(winner=winner, output=output)


EXECUTOR = RaceExecutor()
