"""Human input: what a run waits for, how a node says so, and where answers are kept.

An `ask` node (`treadle.runtime.nodes.ask`) with no answer yet raises `InputPending` with
its `InputRequest`. The orchestrator lets everything else of the run that can still run
finish, then the scopes above it pass the requests on, and the runtime parks the run:
status `waiting`, the requests in `RunRecord.pending_inputs` and in `InputRequested`
events, no task, no scheduler slot, no KV pin.

An answer is journaled as an output of its own, under `answer_key(instance)` (a key no
node instance can have), by `treadle.runtime.execution.inputs.record_input`. When the run
resumes, the `ask` node finds it, validates it, and its value becomes the node's output.
A request's first asking is journaled the same way (`request_key`), so a resumed run
keeps the time it was asked and its deadline.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

#: suffixes of the journal entries of a request and its answer (`$` is never in a node id)
_ANSWER = "$answer"
_REQUEST = "$request"


def answer_key(instance: str) -> str:
    """The journal key of the answer to `instance`'s request."""
    return instance + _ANSWER


def request_key(instance: str) -> str:
    """The journal key of `instance`'s request, written when it is first asked."""
    return instance + _REQUEST


def answered_node(key: str) -> str | None:
    """The instance whose answer a journal key holds (None: the key holds no answer)."""
    return key[: -len(_ANSWER)] if key.endswith(_ANSWER) else None


class InputRequest(BaseModel):
    """One question a waiting run puts to a person: what a form needs to ask it."""

    #: the `ask` node instance (`approve`, `review[2]`, `fix[1]/confirm`)
    node: str
    #: the text for the person, the node's prompt with its inputs filled in
    prompt: str
    #: JSON Schema the answer must match (the node's output type)
    answer_schema: dict[str, Any] = Field(default_factory=dict)
    #: whether `default` is the answer once `expires_at` has passed
    has_default: bool = False
    default: Any = None
    #: when it was first asked, and after when it is answered by `default` (epoch seconds;
    #: None: it waits until answered)
    requested_at: float = 0.0
    expires_at: float | None = None


class Answer(BaseModel):
    """An answer as journaled: its value (JSON), the client's idempotency key, and when."""

    value: Any = None
    key: str | None = None
    answered_at: float = 0.0


class InputPending(Exception):
    """Raised out of a scope whose remaining nodes wait for human input (after everything
    else in it has finished). Not a failure: retries and error policies do not apply."""

    retryable = False

    def __init__(self, requests: list[InputRequest]) -> None:
        super().__init__(f"waiting for input at {', '.join(r.node for r in requests)}")
        self.requests = requests

    @staticmethod
    def merge(pending: list[InputPending]) -> InputPending:
        return InputPending([r for p in pending for r in p.requests])
