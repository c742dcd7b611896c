"""Per-run state shared by every graph scope of a run: ids, the event sequence, the journal,
restored outputs, and the ways out of the run for the calls its nodes make (`LLMCall`,
`ToolInvocation`), each through the runtime's interceptor chain
(`treadle.runtime.core.interceptors`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from treadle.backends.base import Backend, LLMRequest, LLMResponse
from treadle.runtime.core.cache import ResultCache
from treadle.runtime.core.events import Event
from treadle.runtime.core.journal import Journal
from treadle.tools import Tool

_now = time.time


#: called synchronously with every event of a run (tracing, metrics, displays)
Listener = Callable[["RunContext", Event], None]


class NodeAdmission(Protocol):
    """What a node that cancels other nodes (a race) tells the runtime's admission
    (`treadle.runtime.core.interceptors.CallAdmission`)."""

    def end_node(self, ctx: RunContext, node: str, reason: str) -> None:
        """Node instance `node`, and every instance under it, was cancelled: release what
        the admission holds for them (a KV pin one of their calls set)."""


#: receives an answer's text as it streams; returning True says the caller has all it needs,
#: and the generation is stopped there (the stream is closed, which aborts it on the server)
TextSink = Callable[[str], Awaitable[bool | None]]


@dataclass
class RunOptions:
    #: stream LLM tokens as `LLMTokens` events (backends that can stream)
    stream_tokens: bool = False
    #: at most this many node attempts run at once in the run (None: no limit)
    max_concurrency: int | None = None
    tenant: str | None = None


@dataclass(eq=False)
class LLMCall:
    """One LLM call on its way to its backend. An interceptor may replace `request` (e.g.
    with more headers) before it passes the call on."""

    ctx: RunContext
    #: the node instance that makes the call, and the call's id in the run's events
    node: str
    call_id: str
    #: the model alias and the backend it maps to
    alias: str
    backend: Backend
    request: LLMRequest
    # -- kept by the gateway (`treadle.runtime.core.gateway`) --
    on_text: TextSink | None = field(default=None, repr=False)
    queued_at: float = field(default=0.0, repr=False)
    sent_at: float | None = field(default=None, repr=False)
    streamed: bool = field(default=False, repr=False)


@dataclass(eq=False)
class ToolInvocation:
    """One tool call on its way to its tool. `idempotency_key` is given to tools that are not
    idempotent (None for those that are)."""

    ctx: RunContext
    node: str
    call_id: str
    tool: Tool
    arguments: dict[str, Any] | str | None
    idempotency_key: str | None


#: an LLM call's way out: the interceptor chain, then its backend
SendLLM = Callable[[LLMCall], Awaitable[LLMResponse]]
#: a tool call's way out: the interceptor chain, then the tool
InvokeTool = Callable[[ToolInvocation], Awaitable[Any]]


class RunContext:
    """Everything one run's node executions share."""

    def __init__(
        self,
        run_id: str,
        journal: Journal,
        *,
        backends: Mapping[str, Backend],
        send_llm: SendLLM,
        invoke_tool: InvokeTool,
        options: RunOptions,
        restored: dict[str, bytes] | None = None,
        first_seq: int = 1,
        listeners: Sequence[Listener] = (),
        cache: ResultCache | None = None,
        admission: NodeAdmission | None = None,
    ) -> None:
        self.run_id = run_id
        self.journal = journal
        #: model alias -> backend, for the run's LLM calls
        self.backends = dict(backends)
        self.send_llm = send_llm
        self.invoke_tool = invoke_tool
        self.options = options
        #: where nodes with the `cache` option keep their outputs (None: not cached)
        self.cache = cache
        #: the runtime's admission, told when a node instance is cancelled (a race's loser)
        self.admission = admission
        self.restored = restored or {}
        self._seq = first_seq - 1
        #: every event of this run in this process; the journal persists it incrementally
        self.log: list[Event] = journal.log
        self._listeners = tuple(listeners)
        self._changed: anyio.Event | None = None
        self.limiter = (
            anyio.CapacityLimiter(options.max_concurrency) if options.max_concurrency else None
        )
        self.llm_call_counter = 0

    def emit(self, cls: type[Event], *args: Any, **fields: Any) -> Event:
        """Record an event; the fields after (seq, run_id, ts) are given in order or by name."""
        self._seq += 1
        event = cls(self._seq, self.run_id, _now(), *args, **fields)
        self.log.append(event)
        if self._changed is not None:
            changed, self._changed = self._changed, None
            changed.set()
        for listener in self._listeners:
            listener(self, event)
        return event

    async def wait_for_events(self, after: int) -> None:
        """Return once the log holds more than `after` events."""
        while len(self.log) <= after:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
