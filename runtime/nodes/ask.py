"""The `ask` node's executor: human input (see `treadle.runtime.core.waiting`).

Without an answer in the journal, the node asks: the first time it emits `InputRequested`
and journals the request (so a resumed run keeps its time and deadline), then raises
`InputPending`, and the run parks once nothing else can run. With an answer, it validates
it against the node's output type and returns it (`InputReceived`). Once the deadline has
passed, the default is the answer, or, without one, the node fails.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from treadle.graphs.kinds import AskNode
from treadle.runtime.core.errors import NodeError, OutputError
from treadle.runtime.core.events import InputReceived, InputRequested
from treadle.runtime.core.values import adapter, as_text
from treadle.runtime.core.waiting import (
    Answer,
    InputPending,
    InputRequest,
    answer_key,
    request_key,
)
from treadle.runtime.nodes.base import NodeCall, NodeExecutor


class AskExecutor(NodeExecutor[AskNode]):
    spec = AskNode
    takes_slot = False  # it holds nothing while it waits

    async def run(self, call: NodeCall[AskNode]) -> Any:
        ctx, spec, instance = call.ctx, call.spec, call.instance
        raw = ctx.restored.get(answer_key(instance))
        if raw is not None:
            answer = Answer.model_validate_json(raw)
            value = check_answer(spec, answer.value, instance)
            ctx.emit(InputReceived, node=instance, key=answer.key)
            return value
        request = self._request(call)
        if request.expires_at is not None and time.time() >= request.expires_at:
            if spec.has_default:
                ctx.emit(InputReceived, node=instance, defaulted=True)
                return check_answer(spec, spec.default, instance)
            raise NodeError(
                instance, f"no answer within {spec.deadline_s:g} s (deadline_s)", retryable=False
            )
        raise InputPending([request])

    def _request(self, call: NodeCall[AskNode]) -> InputRequest:
        """The node's request: as first asked (journaled), or asked now."""
        ctx, spec, instance = call.ctx, call.spec, call.instance
        key = request_key(instance)
        raw = ctx.restored.get(key)
        if raw is not None:
            return InputRequest.model_validate_json(raw)
        now = time.time()
        output = adapter(spec.output)
        request = InputRequest(
            node=instance,
            prompt=spec.prompt.format(**{k: as_text(v) for k, v in call.inputs.items()}),
            answer_schema=output.json_schema(),
            has_default=spec.has_default,
            default=output.dump_python(output.validate_python(spec.default), mode="json")
            if spec.has_default
            else None,
            requested_at=now,
            expires_at=now + spec.deadline_s if spec.deadline_s is not None else None,
        )
        ctx.emit(
            InputRequested,
            node=instance,
            prompt=request.prompt,
            answer_schema=request.answer_schema,
            has_default=request.has_default,
            default=request.default,
            expires_at=request.expires_at,
        )
        data = request.model_dump_json().encode()
        # durable with the run's next commit (at the latest when it parks)
        ctx.journal.stage(key, data)
        ctx.restored[key] = data
        return request


def check_answer(spec: AskNode, value: Any, instance: str) -> Any:
    """`value` as the node's output type (`OutputError` if it does not fit)."""
    try:
        return adapter(spec.output).validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(answer)'}: {e['msg']}" for e in exc.errors()
        )
        raise OutputError(instance, f"the answer does not fit the request: {problems}") from None


EXECUTOR = AskExecutor()
