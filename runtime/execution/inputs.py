"""Answering a waiting run: `record_input` checks an answer against the request it answers
and journals it, where the run's `ask` node finds it when the run resumes.

Every way in uses it: `Runtime.resume(run_id, graph, input=...)`, `RunHandle.resume(...)`,
`treadle resume RUN_ID --input ...`, and the daemon's `POST /v1/runs/{id}/input`.

The answer's value is checked by an `AnswerCheck`: `answers_of(cg)` checks it against a
compiled graph in this process; the daemon's API asks its definition checker's child
process instead, so that no tenant's definition is compiled on the API's event loop.

Idempotent on the client's key: an answer given again with the key it was first given
with is accepted again (`replayed`) and changes nothing; another answer to a request that
has one is a conflict. Recording does not resume the run: the caller does (the SDK
executes it; the daemon queues it for a worker).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from treadle.errors import RunError
from treadle.graphs.compiled import CompiledGraph
from treadle.graphs.kinds import AskNode
from treadle.runtime.core.errors import OutputError
from treadle.runtime.core.store import TERMINAL, RunNotFound, RunRecord, StateStore
from treadle.runtime.core.values import adapter
from treadle.runtime.core.waiting import Answer, InputRequest, answer_key, answered_node
from treadle.runtime.nodes.ask import check_answer

__all__ = [
    "AnswerCheck",
    "InputConflict",
    "InputRejected",
    "InputResult",
    "answer_value",
    "answers_of",
    "choose_request",
    "record_input",
]

#: (ask instance, value) -> the value as the answer keeps it (JSON); raises `InputRejected`
AnswerCheck = Callable[[str, Any], Awaitable[Any]]


class InputRejected(RunError, ValueError):
    """The answer does not fit the request (or names no request): nothing was recorded."""


class InputConflict(RunError, RuntimeError):
    """The run does not wait for this answer (it is not waiting, or the request has been
    answered with another key): nothing was recorded."""


@dataclass(frozen=True)
class InputResult:
    #: the `ask` instance answered
    node: str
    #: the same answer, with the same key, was recorded before: nothing changed now
    replayed: bool
    #: the run's other open requests
    pending: list[InputRequest]


def answer_value(cg: CompiledGraph, node: str, value: Any) -> Any:
    """`value` checked against the output type of the `ask` instance `node` of `cg`, as the
    answer keeps it (JSON); `InputRejected` when it does not fit or `node` asks nothing."""
    spec = cg.node_at(node)
    if spec is None or not isinstance(spec.spec, AskNode):
        raise InputRejected(f"{node!r} is not an ask node of workflow {cg.name!r}")
    try:
        checked = check_answer(spec.spec, value, node)
    except OutputError as exc:
        raise InputRejected(exc.reason) from None
    return adapter(spec.spec.output).dump_python(checked, mode="json")


def answers_of(cg: CompiledGraph) -> AnswerCheck:
    """An `AnswerCheck` against `cg`, in this process."""

    async def check(node: str, value: Any) -> Any:
        return answer_value(cg, node, value)

    return check


async def record_input(
    store: StateStore,
    check: AnswerCheck,
    run_id: str,
    value: Any,
    *,
    node: str | None = None,
    key: str | None = None,
    record: RunRecord | None = None,
) -> InputResult:
    """Journal `value` as the answer to the run's request at `node` (which may be left out
    when the run waits on one request only), after checking it against the node's output
    type (`check`). `record`, when the caller has just read it, saves reading it again."""
    if record is None:
        record = await store.get_run(run_id)
        if record is None:
            raise RunNotFound(run_id)
    outputs = await store.load_outputs(run_id)
    if node is None:
        node = _replayed_node(outputs, key) or choose_request(record).node
    previous = outputs.get(answer_key(node))
    if previous is not None:
        answer = Answer.model_validate_json(previous)
        if key is not None and answer.key == key:
            return InputResult(node, True, [r for r in record.pending_inputs if r.node != node])
        raise InputConflict(f"run {run_id!r}: the request at {node!r} has been answered already")
    # a request stays open until answered, also while the run runs again after another
    # answer (it picks this one up when it would park)
    if record.status in TERMINAL or all(r.node != node for r in record.pending_inputs):
        open_ = ", ".join(r.node for r in record.pending_inputs) or "none"
        raise InputConflict(
            f"run {run_id!r} ({record.status}) is not waiting for input at {node!r} "
            f"(open requests: {open_})"
        )
    answer = Answer(value=await check(node, value), key=key, answered_at=time.time())
    # only the run writes its `pending_inputs` (when it parks; an answered request is gone
    # from the list then): two writers of the list could lose each other's requests
    await store.record(run_id, [], {answer_key(node): answer.model_dump_json().encode()})
    return InputResult(node, False, [r for r in record.pending_inputs if r.node != node])


def choose_request(record: RunRecord) -> InputRequest:
    """The one request a run waits on (`InputRejected` when it waits on several, and
    `InputConflict` when on none)."""
    pending = record.pending_inputs
    if record.status in TERMINAL or not pending:
        raise InputConflict(f"run {record.run_id!r} ({record.status}) is not waiting for input")
    if len(pending) > 1:
        nodes = ", ".join(r.node for r in pending)
        raise InputRejected(f"run {record.run_id!r} waits on {len(pending)} requests ({nodes}): "
                            "say which one this answers (node)")  # fmt: skip
    return pending[0]


def _replayed_node(outputs: dict[str, bytes], key: str | None) -> str | None:
    """The request an earlier answer with idempotency key `key` answered (None: none)."""
    if key is None:
        return None
    for name, data in outputs.items():
        node = answered_node(name)
        if node is not None and Answer.model_validate_json(data).key == key:
            return node
    return None
