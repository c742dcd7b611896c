"""`SchedulerAdmission`: the scheduler and the pinning policy behind the runtime's
`CallAdmission` hook (the innermost interceptor of its call chain), in real time.

    admission = SchedulerAdmission(graphs=[cg], tools=[search, run_tests],
                                   pin_releasers={"local": HTTPPinReleaser(url)})
    async with admission:                       # background pin releases (optional)
        runtime = Runtime(models={"local": backend}, admission=admission)
        await runtime.run(cg, inputs, tenant="acme")

Every LLM call of every run that uses this runtime goes through `admit`: the run becomes a
program of the `Scheduler` (one lane per model alias), the call is queued and `admit`
returns when the scheduler dispatches it, with the request's hints filled in: the
backend priority (treadle convention, lower first) and, when the backend can pin
(`Capabilities.pin_ttl`) and the conversation continues after a tool, `pin_ttl_s` from
`PinPolicy` (a quantile of the next tool's predicted duration when the saving beats the
cost at the backend's current memory pressure). Backends without pinning get no TTL: they
keep session affinity (`program_id`) and the priority.

Pins are tracked in a `PinBook` and reported as `PinSet` / `PinReleased` events of the run:

- set when a call that asked for one finishes with tool calls (the server pinned it);
  an answer without tool calls ends the conversation, so its pin is released at once;
  when the answer names a tool whose own estimate wants a shorter TTL, the pin is
  released at that shorter deadline (needs the background task group);
- released when the program's next call arrives (the server hands the blocks to it),
  when the run ends or is cancelled, when the backend's memory pressure rises past
  `shed_pressure` (least valuable pins first), or at expiry.

Releases that need the server (`POST /v1/pins/release` on treadle's simulator, or a
backend's own `release_pins`) run in the background task group while the admission is
entered (`async with admission:`); otherwise they run at the next `admit`.

KV residency: with `kv_budget_tokens` (what each backend's KV cache holds; vLLM logs it
at start as "GPU KV cache size"), every lane gets that budget and runs are admitted by
their working set (`residency.py`): the tokens of the call being sent plus its expected
answer, then of the conversation it continues (from the response's usage). A run that
does not fit waits before its first call and holds no KV; an admitted one is never
displaced by newcomers; when runs outgrow a backend, the one whose tools keep it idle
longest is suspended (its pin released) until its next call. A resident run's pins are
priced at no memory pressure: its memory is reserved already.

Static facts: register compiled graphs (`graphs=` or `register_graph`) so calls carry their
node's remaining critical-path cost (`GraphFacts.remaining_cost_s`); without them every call
of a run weighs the same. Tool durations feed the pinning estimator when tools are
registered (`tools=` or `register_tools`), through `Tool.add_observer`.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from treadle.backends.base import Backend, Capabilities, LLMRequest, LLMResponse
from treadle.backends.tokens import CHARS, TokenEstimator, estimate_prompt_tokens
from treadle.runtime.core.events import PinReleased, PinSet, RunStarted
from treadle.runtime.sched.limits import TTFTSignal
from treadle.runtime.sched.pinning import (
    Pin,
    PinBook,
    PinDecision,
    PinPolicy,
    PinRequest,
    ToolDurations,
)
from treadle.runtime.sched.scheduler import DISPATCHED, Call, Program, Scheduler, SchedulerConfig

if TYPE_CHECKING:
    from treadle.graphs.analysis import GraphFacts
    from treadle.graphs.compile import CompiledGraph
    from treadle.runtime.core.context import RunContext
    from treadle.tools.base import Tool

_log = logging.getLogger(__name__)

#: program_id -> pins released
PinReleaser = Callable[[str], Awaitable[int]]

_INSTANCE = re.compile(r"\[\d+\]")


class HTTPPinReleaser:
    """Releases a program's pins on treadle's simulator server (`POST /v1/pins/release`).

    `base_url` is the server root or its `/v1` base."""

    def __init__(
        self, base_url: str, *, client: httpx.AsyncClient | None = None, timeout_s: float = 5.0
    ) -> None:
        root = base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.url = root + "/v1/pins/release"
        self._client = client
        self.timeout_s = timeout_s

    async def __call__(self, program_id: str) -> int:
        client = self._client or httpx.AsyncClient(timeout=self.timeout_s)
        try:
            response = await client.post(self.url, json={"program_id": program_id})
            response.raise_for_status()
            return int(response.json().get("released", 0))
        finally:
            if self._client is None:
                await client.aclose()


def backend_releaser(backend: Backend) -> PinReleaser | None:
    """A releaser for a backend that has `release_pins(program_id)` (sync or async)."""
    fn = getattr(backend, "release_pins", None)
    if not callable(fn):
        return None

    async def release(program_id: str) -> int:
        out = fn(program_id)
        if inspect.isawaitable(out):
            out = await out
        return int(out or 0)

    return release


@dataclass(eq=False)
class AdmissionTicket:
    """What `admit` hands the gateway and gets back in `release`."""

    call: Call
    ctx: RunContext
    node: str
    call_id: str
    alias: str
    prompt_tokens: int
    pin: PinDecision | None = None
    sent_at: float = 0.0


@dataclass(eq=False)
class _Run:
    ctx: RunContext
    facts: GraphFacts | None
    aliases: set[str] = field(default_factory=set)
    outputs: int = 0
    output_tokens: int = 0

    def expected_output(self, max_tokens: int | None) -> int:
        """The answer's expected length: the run's mean so far, else its cap (at most a
        thousand tokens: a cap is an upper bound, not an estimate)."""
        if self.outputs:
            return self.output_tokens // self.outputs
        return min(max_tokens or 256, 1024)


@dataclass
class _LaneState:
    """What the adapter knows about one backend: its load, from its metrics."""

    pressure: float = 0.0
    waiting: int = 0
    checked_at: float = -math.inf


class SchedulerAdmission:
    """`CallAdmission` over `Scheduler` + `PinPolicy` (module docstring)."""

    def __init__(
        self,
        scheduler: Scheduler | None = None,
        *,
        config: SchedulerConfig | None = None,
        durations: ToolDurations | None = None,
        pin_policy: PinPolicy | None = None,
        pin_releasers: Mapping[str, PinReleaser] | None = None,
        graphs: Iterable[CompiledGraph] = (),
        tools: Iterable[Tool] = (),
        tenant_weights: Mapping[str, float] | None = None,
        kv_capacity_tokens: int = 400_000,
        kv_budget_tokens: int | None = None,
        prefill_tokens_per_s: float = 20_000.0,
        decode_s_per_token: float = 0.002,
        metrics_interval_s: float = 1.0,
        shed_pressure: float = 0.95,
        tokens: TokenEstimator = CHARS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scheduler = scheduler if scheduler is not None else Scheduler([], config)
        #: estimates a call's prompt tokens (its cost) before the backend reports them
        self.tokens = tokens
        self.durations = durations or ToolDurations()
        self.pin_policy = pin_policy or PinPolicy(self.durations)
        self.pins = PinBook()
        self.pins.listeners.append(self._on_pin)
        self.releasers: dict[str, PinReleaser] = dict(pin_releasers or {})
        self.kv_capacity_tokens = kv_budget_tokens or kv_capacity_tokens
        self.kv_budget_tokens = kv_budget_tokens
        if self.scheduler.on_suspend is None:
            self.scheduler.on_suspend = self._suspended
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.decode_s_per_token = decode_s_per_token
        self.metrics_interval_s = metrics_interval_s
        self.shed_pressure = shed_pressure
        self.clock = clock
        # without server gauges, congestion is read from time to first token
        self.ttft = TTFTSignal(tolerance=4.0, slack_s=0.25)
        self._facts: dict[str, GraphFacts] = {}
        self._runs: dict[str, _Run] = {}
        self._lanes: dict[int, _LaneState] = {}
        self._pending_releases: list[tuple[str, str]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._timers: set[anyio.CancelScope] = set()
        self.release_errors: list[str] = []
        for cg in graphs:
            self.register_graph(cg)
        self.register_tools(tools)
        for tenant, weight in (tenant_weights or {}).items():
            self.scheduler.set_weight(tenant, weight)

    # -- registration ----------------------------------------------------------------------

    def register_graph(self, cg: CompiledGraph) -> None:
        """Use `cg`'s static facts (critical path) for its runs."""
        self._facts[cg.name] = cg.facts

    def register_tools(self, tools: Iterable[Tool]) -> None:
        """Seed and update the duration estimates of `tools` from their calls."""
        self.durations.register_all(tools)

    # -- background releases -----------------------------------------------------------------

    async def __aenter__(self) -> SchedulerAdmission:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        tg, self._tg = self._tg, None
        # early-release timers are not worth waiting for: those pins expire on their own
        for timer in list(self._timers):
            timer.cancel()
        await self._flush_releases()
        return await tg.__aexit__(exc_type, exc, tb)

    def _release_on_server(self, alias: str, program_id: str) -> None:
        if alias not in self.releasers:
            return
        if self._tg is not None:
            self._tg.start_soon(self._do_release, alias, program_id)
        else:
            self._pending_releases.append((alias, program_id))

    async def _do_release(self, alias: str, program_id: str) -> None:
        try:
            await self.releasers[alias](program_id)
        except Exception as exc:  # the pin expires on its own; say so, do not fail the run
            message = f"{alias}: releasing the pins of {program_id}: {exc}"
            _log.warning("%s (they expire at their deadline)", message)
            self.release_errors.append(message)

    async def _flush_releases(self) -> None:
        pending, self._pending_releases = self._pending_releases, []
        for alias, program_id in pending:
            await self._do_release(alias, program_id)

    def _release_later(self, delay_s: float, pin: Pin, alias: str) -> None:
        if self._tg is None:
            return

        async def later() -> None:
            with anyio.CancelScope() as scope:
                self._timers.add(scope)
                try:
                    await anyio.sleep(delay_s)
                finally:
                    self._timers.discard(scope)
                if self.pins.get(pin.program_id) is pin:
                    self.pins.cancel(pin.program_id, "tool_estimate")
                    await self._do_release(alias, pin.program_id)

        self._tg.start_soon(later)

    # -- runs --------------------------------------------------------------------------------

    def _run(self, ctx: RunContext) -> _Run:
        run = self._runs.get(ctx.run_id)
        if run is not None:
            return run
        graph = next((e.graph for e in ctx.log if isinstance(e, RunStarted)), None)
        run = _Run(ctx, self._facts.get(graph) if graph is not None else None)
        self._runs[ctx.run_id] = run
        return run

    def _suspended(self, program: Program, reason: str) -> None:
        """The scheduler took the run off its backend: its pin holds nothing useful now."""
        run = self._runs.get(program.program_id)
        if self.pins.cancel(program.program_id, reason) is not None and run is not None:
            for alias in run.aliases:
                self._release_on_server(alias, program.program_id)

    def end_run(self, ctx: RunContext, status: str) -> None:
        """The run is over, cancelled, interrupted or parked to wait for a person: its pin
        is of no use to anyone now, and its calls still queued will never be sent. (A
        parked run is a new program of the scheduler when it resumes.)"""
        reason = status if status in ("cancelled", "interrupted", "waiting") else "run_finished"
        pin = self.pins.cancel(ctx.run_id, reason)
        run = self._runs.pop(ctx.run_id, None)
        if pin is not None and run is not None:
            for alias in run.aliases:
                self._release_on_server(alias, ctx.run_id)
        for call in self.scheduler.cancel_program(ctx.run_id, self.clock()):
            if isinstance(call.payload, anyio.Event):
                call.payload.set()
        self._pump()

    def end_node(self, ctx: RunContext, node: str, reason: str) -> None:
        """Node instance `node` was cancelled while its run goes on (a race's loser): a
        pin that one of its calls (or of the instances under it) set is of no use now."""
        pin = self.pins.get(ctx.run_id)
        if pin is None or not _under(pin.node, node):
            return
        self.pins.cancel(ctx.run_id, reason)
        run = self._runs.get(ctx.run_id)
        for alias in run.aliases if run is not None else ():
            self._release_on_server(alias, ctx.run_id)

    def _on_pin(self, kind: str, pin: Pin, reason: str, used: bool) -> None:
        if kind != "released":
            return
        run = self._runs.get(pin.program_id)
        if run is not None:
            run.ctx.emit(PinReleased, node=pin.node, call_id=pin.call_id, reason=reason, used=used)

    # -- the CallAdmission protocol ------------------------------------------------------------

    async def admit(
        self, ctx: RunContext, node: str, call_id: str, request: LLMRequest
    ) -> tuple[AdmissionTicket, LLMRequest]:
        if self._pending_releases:
            await self._flush_releases()
        now = self.clock()
        run = self._run(ctx)
        alias = request.model
        run.aliases.add(alias)
        backend = ctx.backends.get(alias)
        if backend is not None and alias not in self.releasers:
            found = backend_releaser(backend)
            if found is not None:
                self.releasers[alias] = found
        lane = self.scheduler.lane_index(alias)
        if lane is None:
            lane = self.scheduler.add_lane(alias, kv_budget=self.kv_budget_tokens)
        # the program's next call: its pin (if any) did its job; the server hands the
        # blocks to this call when it runs
        self.pins.on_next_call(ctx.run_id, now)
        prompt_tokens = estimate_prompt_tokens(request, self.tokens)
        out = run.expected_output(request.max_tokens)
        call = Call(
            f"{ctx.run_id}/{call_id}",
            ctx.run_id,
            est_service_s=self._service_s(prompt_tokens, 0, out),
            remaining_cost_s=self._remaining(run, node),
            lane=lane,
            payload=anyio.Event(),
        )
        self.scheduler.submit(call, now, tenant=ctx.options.tenant, kv_tokens=prompt_tokens + out)
        self._pump()
        if call.state != DISPATCHED:
            try:
                assert isinstance(call.payload, anyio.Event)
                await call.payload.wait()
            except BaseException:
                # cancelled while queued: withdraw it, or hand back the slot it just got
                if not self.scheduler.cancel_call(call) and call.state == DISPATCHED:
                    self.scheduler.complete(call, self.clock())
                self._pump()
                raise
            if call.state != DISPATCHED:
                raise RuntimeError(f"LLM call {call_id} was withdrawn: run {ctx.run_id} ended")
        caps = backend.capabilities if backend is not None else Capabilities()
        await self._refresh_lane(lane, backend, caps)
        update: dict[str, Any] = {"priority": call.priority}
        decision: PinDecision | None = None
        hints = request.hints
        if caps.pin_ttl and hints.pin_ttl_s is None and request.tools and not hints.is_last_step:
            tokens = prompt_tokens + out
            decision = self.pin_policy.decide(
                PinRequest(
                    tokens=tokens,
                    prefill_s=tokens / self.prefill_tokens_per_s,
                    capacity_tokens=self.kv_capacity_tokens,
                    pressure=self.scheduler.pin_pressure(ctx.run_id, self._lanes[lane].pressure),
                    tool=hints.next_tool,
                    is_last_step=hints.is_last_step,
                )
            )
            if decision.pin:
                update["pin_ttl_s"] = decision.ttl_s
            else:
                decision = None
        request = request.model_copy(update={"hints": hints.model_copy(update=update)})
        ticket = AdmissionTicket(
            call, ctx, node, call_id, alias, prompt_tokens, decision, sent_at=self.clock()
        )
        return ticket, request

    def release(self, ticket: Any, response: LLMResponse | None) -> None:
        if not isinstance(ticket, AdmissionTicket):
            return
        now = self.clock()
        congested: bool | None = None
        if response is not None:
            usage = response.usage
            prompt = usage.prompt_tokens or ticket.prompt_tokens
            service = self._service_s(prompt, usage.cached_prompt_tokens, usage.completion_tokens)
            lane_state = self._lanes.get(ticket.call.lane or 0)
            if lane_state is not None and lane_state.checked_at > -math.inf:
                # the server's own gauges: requests wait because its memory is full (a
                # queue for the prefill token budget alone is not: the batch is full and
                # busy, and more in flight would only queue there)
                congested = lane_state.waiting > 0 and lane_state.pressure >= self.shed_pressure
            else:
                congested = self.ttft.congested(response.ttft_s, prompt)
        else:
            service = ticket.call.est_service_s
        self.scheduler.complete(ticket.call, now, service_s=service, congested=congested)
        if response is not None:
            self._after(ticket, response, now)
        if response is not None and ticket.pin is not None and ticket.pin.ttl_s is not None:
            self._pinned(ticket, response, now)
        self._pump()

    def _after(self, ticket: AdmissionTicket, response: LLMResponse, now: float) -> None:
        """What the answer says about the run's KV: the conversation it continues, and how
        long its tools will keep it away from the GPU."""
        usage = response.usage
        run = self._runs.get(ticket.ctx.run_id)
        if run is not None and usage.completion_tokens:
            run.outputs += 1
            run.output_tokens += usage.completion_tokens
        pid = ticket.call.program_id
        context = (usage.prompt_tokens or ticket.prompt_tokens) + usage.completion_tokens
        self.scheduler.set_working_set(pid, context, now)
        expected = max(
            (self.durations.estimator(c.name).mean() for c in response.tool_calls), default=0.0
        )
        self.scheduler.idle(pid, now, expected)

    # -- pins ----------------------------------------------------------------------------------

    def _pinned(self, ticket: AdmissionTicket, response: LLMResponse, now: float) -> None:
        decision = ticket.pin
        assert decision is not None and decision.ttl_s is not None
        usage = response.usage
        tokens = (usage.prompt_tokens + usage.completion_tokens) or ticket.prompt_tokens
        ticket.ctx.emit(
            PinSet, node=ticket.node, call_id=ticket.call_id, ttl_s=decision.ttl_s, tokens=tokens
        )
        pin = Pin(
            program_id=ticket.call.program_id,
            call_id=ticket.call_id,
            node=ticket.node,
            lane=ticket.call.lane or 0,
            tokens=tokens,
            ttl_s=decision.ttl_s,
            set_at=now,
            deadline=now + decision.ttl_s,
            saving_s=decision.saving_s,
        )
        self.pins.set(pin)
        if not response.tool_calls:
            # no tool call: this conversation is over, nothing will reuse the pin
            self.pins.cancel(pin.program_id, "no_tool_call")
            self._release_on_server(ticket.alias, pin.program_id)
            return
        # the answer names its tools: their own estimates may want a shorter TTL
        slowest = max(
            (self.durations.estimator(c.name) for c in response.tool_calls),
            key=lambda e: e.mean(),
        )
        wanted = slowest.quantile(decision.quantile or 0.9)
        if wanted < decision.ttl_s:
            self._release_later(wanted, pin, ticket.alias)

    def shed(self, lane: int, now: float | None = None) -> list[Pin]:
        """Release every pin on `lane` (memory pressure rose), least valuable first."""
        t = self.clock() if now is None else now
        out = self.pins.shed(lane, self.pins.pinned_tokens(lane), t)
        name = self.scheduler.lanes[lane].name
        for pin in out:
            self._release_on_server(name, pin.program_id)
        return out

    # -- internals -----------------------------------------------------------------------------

    def _pump(self) -> None:
        for call in self.scheduler.dispatch(self.clock()):
            if isinstance(call.payload, anyio.Event):
                call.payload.set()

    def _service_s(self, prompt: int, cached: int, output: int) -> float:
        uncached = max(0, prompt - cached)
        return uncached / self.prefill_tokens_per_s + output * self.decode_s_per_token

    def _remaining(self, run: _Run, node: str) -> float:
        if run.facts is None:
            return 0.0
        top = _INSTANCE.sub("", node.split("/", 1)[0])
        return run.facts.remaining_cost_s.get(top, 0.0)

    async def _refresh_lane(self, lane: int, backend: Backend | None, caps: Capabilities) -> None:
        """Memory pressure and waiting count from the backend's metrics, at most once per
        `metrics_interval_s`; pins are shed when pressure passes `shed_pressure`."""
        state = self._lanes.setdefault(lane, _LaneState())
        now = self.clock()
        if backend is None or not caps.metrics or now - state.checked_at < self.metrics_interval_s:
            return
        state.checked_at = now
        metrics = getattr(backend, "metrics", None)
        if not callable(metrics):
            return
        try:
            load = metrics()
            if inspect.isawaitable(load):
                load = await load
        except Exception as exc:  # no signal this time; scheduling goes on without it
            _log.warning("metrics of %s unavailable: %s", self.scheduler.lanes[lane].name, exc)
            return
        usage = float(getattr(load, "kv_usage", None) or 0.0)
        state.waiting = int(getattr(load, "waiting", 0) or 0)
        # requests waiting while memory is nearly full: over-subscribed
        state.pressure = 1.0 if state.waiting > 0 and usage >= self.shed_pressure else usage
        if state.pressure >= self.shed_pressure and self.pins.pinned_tokens(lane):
            self.shed(lane, now)


def _under(instance: str, node: str) -> bool:
    """Whether `instance` is node instance `node` or one it runs (`node/x`, `node[2]`)."""
    return instance == node or instance.startswith((node + "/", node + "["))
