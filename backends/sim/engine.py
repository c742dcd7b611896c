"""One simulated serving-engine replica: continuous batching over a paged, prefix-cached KV.

The engine is a discrete-event model of vLLM (V1) on one GPU (or one tensor-parallel
group), driven by a clock (`clock.py`): virtual time for benchmarks, real time for the HTTP
server. docs/benchmarks.md describes its physics (the engine simulator); the numbers come
from a `Profile`.

Public API (stable):

    engine = Engine(profile, clock, EngineConfig(policy="fcfs"), name="replica-0")
    req = SimRequest(prompt, output_len, program_id=..., pin_ttl_s=..., on_finish=cb)
    engine.submit(req)                 # arrives now (clock.now()); returns req
    engine.submit_at(t, req)           # schedules the arrival on the clock
    engine.release_pins(key) -> int    # on-demand pin release (key: program id)
    engine.abort(req) -> bool          # the client went away: free its blocks
    engine.probe(prompt) -> int        # tokens a request with this prompt would hit now
    engine.metrics() -> EngineMetrics  # running, waiting, kv usage, prefix, pins, ...
    engine.num_running, engine.num_waiting, engine.kv_usage
    engine.finished                    # finished requests (EngineConfig.keep_finished)
    engine.on_step = callback          # observe launched steps (StepInfo)
    engine.decoded_tokens(req) -> int  # output so far (`req.output_tokens` is exact only
                                       # between runs and once it has finished)
    EngineConfig(policy, pin_pressure="keep", max_pinned_fraction=0.5, max_num_seqs=None,
                 max_num_batched_tokens=None, kv_capacity_blocks=None,
                 max_jump_steps=None, keep_finished=False)  # None: from the profile

`SimRequest` is both the input and the record. After it finishes: `arrival_time`,
`first_token_time`, `finish_time`, `prompt_tokens`, `cached_tokens` (prefix-cache hit at
its first scheduling), `recomputed_tokens` (prompt/output tokens computed again after
preemption), `output_tokens`, `num_preemptions`, and the properties `ttft`, `latency`.
Callbacks (all optional, called on the clock's thread): `on_first_token(req)`,
`on_token(req)` (after every step that produced tokens for it; setting it makes the
engine step one iteration at a time), `on_finish(req)`.

The model, step by step:

- **Memory**: KV capacity in blocks from the profile (or `EngineConfig.kv_capacity_blocks`);
  see `kvcache.py` for cached / private / free blocks and LRU eviction.
- **Prefix cache**: a request's prompt is a `Prompt` (`blocks.py`: chained block hashes,
  from token ids, opaque segments or a trace's block ids). When it is scheduled it takes
  the longest chain of cached extents (at most `prompt - 1` tokens are reused, as vLLM
  always computes the last prompt token); its own blocks are registered in the cache as
  soon as a prefill chunk completes them, its output blocks when it stops (finishes or is
  preempted) — output blocks have an identity when the request gives `output_tokens`
  (token prompts) or `output_key` (segment prompts), so the next turn of a conversation
  hits them.
- **Batching** (iteration level, chunked prefill): each step gives every decoding request
  one token, then continues running prefills in admission order, then admits waiting
  requests in policy order, within `max_num_batched_tokens` tokens and `max_num_seqs`
  requests. A waiting request is admitted only if its first chunk's blocks fit (after
  eviction); otherwise admission stops (head-of-line, as vLLM). Decodes go first: unlike
  vLLM V1, a long running prefill never starves a decode of its token.
- **Preemption**: when the running requests' blocks for the next step do not fit, the
  lowest-priority running request (policy order; latest arrival first) is preempted: its
  blocks are freed (cached ones stay cached and evictable) and it goes back to the waiting
  queue to be recomputed (prompt + tokens generated so far), keeping its output count.
  A step that had to preempt admits no waiting request (as vLLM). Nothing is ever dropped.
- **Step time**: `Profile.step_time` (roofline) over the step's tokens, attention context
  and KV reads.
- **Policies** (`EngineConfig.policy`): `fcfs` (arrival order), `priority` (lower
  `priority` first, then arrival; vLLM), `program` (Continuum: waiting requests of a
  program that holds a pin first, then by the arrival of the request's program, then the
  request's arrival). Preemption victims are the last in the same order.
- **Pins** (`pin_ttl_s`): when a request with a pin TTL finishes, the blocks of its whole
  sequence are pinned for that long under its `program_id` (its request id when it has
  none): they count toward memory and cannot be evicted. A pin is released (1) at its
  deadline, (2) when the next request of the same program is *scheduled* — it then holds
  the blocks itself, so a queued next step keeps its cache until it runs — and a request
  with `is_last_step` releases its program's pins the same way and sets none, or (3) on
  demand, `release_pins(key)`. Under memory pressure pins are kept by default
  (`pin_pressure="keep"`): waiting requests wait and running ones are preempted as if
  pinned blocks were in use, until the pins expire. With `pin_pressure="release"` pins are
  released earliest deadline first whenever an allocation would otherwise fail (before
  anyone is preempted). A new pin that would take pinned blocks over
  `max_pinned_fraction` of capacity is refused (counted in `pins_refused`).

**Performance.** Decoding requests are kept in aggregate form (a global decode-step
counter, block-phase counts, the sum of their context lengths), so a decode step costs
O(1) plus O(1) per request that finishes. When a step holds no prefill work and no waiting
request can be admitted, the engine advances over all identical-shaped steps up to the next
completion (or the point where decode blocks run out) in one event, summing the step times
in closed form; an arrival or a pin release in the middle truncates the jump at the step
then in progress, so the result is the same as stepping one iteration at a time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import Clock, Timer
from treadle.backends.sim.kvcache import BlockCache, CacheEntry
from treadle.backends.sim.profile import Profile

#: the order in which waiting requests are admitted (vLLM's `--scheduling-policy`, plus
#: Continuum's "program"; the module docstring says how each orders them)
SchedulingPolicy = Literal["fcfs", "priority", "program"]
PinPressure = Literal["keep", "release"]
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = ("fcfs", "priority", "program")

NEW, WAITING, PREFILL, DECODE, FINISHED = range(5)
_STATE_NAMES = {NEW: "new", WAITING: "waiting", PREFILL: "prefill", DECODE: "decode"}
_STATE_NAMES[FINISHED] = "finished"

RequestCallback = Callable[["SimRequest"], None]


@dataclass(frozen=True)
class EngineConfig:
    """Switches of one engine; `None` limits come from the profile."""

    policy: SchedulingPolicy = "fcfs"
    pin_pressure: PinPressure = "keep"
    max_pinned_fraction: float = 0.5
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_capacity_blocks: int | None = None
    #: most decode steps one event may cover (None: up to the next completion)
    max_jump_steps: int | None = None
    keep_finished: bool = False

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; use one of {SCHEDULING_POLICIES}")
        if self.pin_pressure not in ("keep", "release"):
            raise ValueError("pin_pressure must be 'keep' or 'release'")
        if not 0.0 <= self.max_pinned_fraction <= 1.0:
            raise ValueError("max_pinned_fraction must be in [0, 1]")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_capacity_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_jump_steps is not None and self.max_jump_steps < 1:
            raise ValueError("max_jump_steps must be >= 1")


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of one engine's gauges and counters (token counts in tokens)."""

    name: str
    time: float
    running: int
    waiting: int
    kv_usage: float
    kv_capacity_blocks: int
    pinned_blocks: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    pins_active: int
    pins_set: int
    pins_released: int
    pins_expired: int
    pins_refused: int
    preemptions: int
    recomputed_tokens: int
    prompt_tokens: int
    generation_tokens: int
    submitted: int
    finished: int
    aborted: int
    steps: int
    busy_s: float
    evicted_blocks: int

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hits_tokens / self.prefix_queries_tokens
            if self.prefix_queries_tokens
            else 0.0
        )


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One launched step, or a run of `steps` identical decode steps (for observers)."""

    start: float
    end: float
    steps: int
    decode_requests: int
    prefill_tokens: int
    prefill_requests: int


class SimRequest:
    """A request to the simulated engine, and the record of what happened to it."""

    __slots__ = (
        "_L0",
        "_S0",
        "_computed",
        "_dec_c",
        "_dec_epoch",
        "_ends",
        "_g0",
        "_held",
        "_held_blocks",
        "_keys",
        "_n_held",
        "_private",
        "_reported",
        "_seq",
        "_sort_key",
        "_target",
        "_wait_epoch",
        "_watermark",
        "aborted",
        "arrival_time",
        "cached_tokens",
        "finish_time",
        "first_token_time",
        "is_last_step",
        "num_preemptions",
        "on_finish",
        "on_first_token",
        "on_token",
        "output_len",
        "output_tokens",
        "pin_ttl_s",
        "priority",
        "program_id",
        "prompt",
        "prompt_tokens",
        "recomputed_tokens",
        "replica",
        "request_id",
        "sequence",
        "state",
        "tag",
    )

    _ids = itertools.count()

    def __init__(
        self,
        prompt: Prompt,
        output_len: int | None = None,
        *,
        output_tokens: list[int] | tuple[int, ...] | None = None,
        output_key: Any = None,
        request_id: str | None = None,
        priority: int = 0,
        program_id: str | None = None,
        pin_ttl_s: float | None = None,
        is_last_step: bool = False,
        on_first_token: RequestCallback | None = None,
        on_token: RequestCallback | None = None,
        on_finish: RequestCallback | None = None,
        tag: Any = None,
    ):
        """`output_len` tokens will be generated (or `len(output_tokens)`).

        Identity of the output for the prefix cache (optional): `output_tokens` (the ids the
        model generates, for token prompts) or `output_key` (a segment key, for segment
        prompts); without either, output blocks are never shared.
        """
        if output_tokens is not None:
            if output_len is not None and output_len != len(output_tokens):
                raise ValueError("output_len disagrees with len(output_tokens)")
            output_len = len(output_tokens)
        if output_len is None or output_len < 1:
            raise ValueError("a request must generate at least one token (output_len >= 1)")
        if prompt.num_tokens < 1:
            raise ValueError("a request needs a prompt of at least one token")
        if pin_ttl_s is not None and not (0 < pin_ttl_s < math.inf):
            raise ValueError("pin_ttl_s must be a positive, finite number of seconds")
        if output_tokens is not None:
            sequence = prompt.extend_tokens(output_tokens)
        elif output_key is not None:
            sequence = prompt.extend_segments([(output_key, output_len)])
        else:
            sequence = prompt
        self.prompt = prompt
        self.sequence = sequence
        self.prompt_tokens = prompt.num_tokens
        self.output_len = output_len
        self.request_id = request_id if request_id is not None else f"simreq-{next(self._ids)}"
        self.priority = priority
        self.program_id = program_id
        self.pin_ttl_s = pin_ttl_s
        self.is_last_step = is_last_step
        self.on_first_token = on_first_token
        self.on_token = on_token
        self.on_finish = on_finish
        self.tag = tag
        # the record
        self.state = NEW
        self.replica: str | None = None
        self.arrival_time = math.nan
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.cached_tokens: int | None = None
        self.recomputed_tokens = 0
        self.output_tokens = 0
        self.num_preemptions = 0
        self.aborted = False
        # engine state
        self._keys = sequence.keys
        self._ends = sequence.ends
        self._seq = 0
        self._sort_key: tuple[float, ...] = ()
        self._target = prompt.num_tokens
        self._computed = 0
        self._held: list[CacheEntry] = []
        self._n_held = 0
        self._held_blocks = 0
        self._private = 0
        self._watermark = 0
        self._wait_epoch = 0
        self._dec_epoch = 0
        self._dec_c = 0
        self._L0 = 0
        self._g0 = 0
        self._S0 = 0
        self._reported = 0

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def status(self) -> str:
        return _STATE_NAMES[self.state]

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the last output token."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time

    def __repr__(self) -> str:
        return (
            f"SimRequest({self.request_id}, {self.status}, prompt={self.prompt_tokens}, "
            f"out={self.output_tokens}/{self.output_len})"
        )


class _Pin:
    __slots__ = ("active", "deadline", "entries", "key", "timer")

    def __init__(self, key: str, entries: list[CacheEntry], deadline: float):
        self.key = key
        self.entries = entries
        self.deadline = deadline
        self.active = True
        self.timer: Timer | None = None


def sum_max_linear(a: float, b: float, c: float, e: float, j: int) -> float:
    """sum_{i=0}^{j-1} max(a + b*i, c + e*i), in closed form."""
    if j <= 0:
        return 0.0

    def lin(p: float, q: float, lo: int, hi: int) -> float:
        n = hi - lo
        return n * p + q * (lo + hi - 1) * n / 2.0 if n > 0 else 0.0

    if b == e:
        return lin(max(a, c), b, 0, j)
    x = (c - a) / (b - e)  # where a + b*i == c + e*i
    if b > e:  # the first term wins from ceil(x) on
        k = min(j, max(0, math.ceil(x)))
        return lin(c, e, 0, k) + lin(a, b, k, j)
    k = min(j, max(0, math.floor(x) + 1))  # the first term wins up to floor(x)
    return lin(a, b, 0, k) + lin(c, e, k, j)


class Engine:
    """One simulated replica (see the module docstring)."""

    def __init__(
        self,
        profile: Profile,
        clock: Clock,
        config: EngineConfig | None = None,
        *,
        name: str = "replica-0",
    ):
        cfg = config or EngineConfig()
        self.profile = profile
        self.clock = clock
        self.config = cfg
        self.name = name
        self.policy: SchedulingPolicy = cfg.policy
        self.block_size = profile.engine.block_size
        self.max_num_seqs = cfg.max_num_seqs or profile.engine.max_num_seqs
        self.max_num_batched_tokens = (
            cfg.max_num_batched_tokens or profile.engine.max_num_batched_tokens
        )
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError("max_num_seqs must not exceed max_num_batched_tokens")
        self.cache = BlockCache(cfg.kv_capacity_blocks or profile.kv_capacity_blocks)
        self.finished: list[SimRequest] = []
        #: called with a StepInfo whenever a step (or a decode run) is launched; a run that
        #: an arrival later truncates is reported as planned
        self.on_step: Callable[[StepInfo], None] | None = None
        # step-time coefficients (Profile.step_time, split for closed-form sums)
        flops = profile.effective_flops
        bw = profile.effective_bandwidth
        self._oh = profile.efficiency.step_overhead_s
        self._c_tok = 2.0 * profile.model.params / flops
        self._c_attn = profile.attn_flops_per_ctx_token / flops
        self._c_w = profile.weight_bytes / bw
        self._c_kv = profile.kv_bytes_per_token / bw
        # running requests
        self._pre: dict[int, SimRequest] = {}  # prefilling, in admission order
        self._dec: dict[int, SimRequest] = {}  # decoding (aggregate form)
        self._S = 0  # decode steps so far
        self._cnt = [0] * self.block_size  # decoders by block phase
        self._dec_base = 0  # sum over decoders of (L0 - S0): sum of contexts = base + B*S
        self._dec_heap: list[tuple[int, int, int, SimRequest]] = []
        self._watched: set[SimRequest] = set()
        # waiting requests
        self._wq: list[tuple[tuple[float, ...], int, int, SimRequest]] = []
        self._pinned_wq: list[tuple[tuple[float, ...], int, int, SimRequest]] = []
        self._waiting_by_program: dict[str, set[SimRequest]] = {}
        self._n_waiting = 0
        self._program_first: dict[str, float] = {}
        # pins
        self._pins: dict[str, list[_Pin]] = {}
        # the step in flight
        self._busy = False
        self._planning = False
        self._plan_pending = False
        self._timer: Timer | None = None
        self._t0 = 0.0
        self._k = 0
        self._coef = (0.0, 0.0, 0.0, 0.0)
        self._chunks: list[tuple[SimRequest, int]] = []
        self._abort_later: list[SimRequest] = []
        self._seqs = itertools.count(1)
        # counters
        self.submitted = 0
        self.n_finished = 0
        self.n_aborted = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.pins_set = 0
        self.pins_released = 0
        self.pins_expired = 0
        self.pins_refused = 0
        self.pins_active = 0
        self.preemptions = 0
        self.recomputed = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.busy_s = 0.0

    # -- public ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._pre) + len(self._dec)

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (referenced, pinned or private), as vLLM reports."""
        return self.cache.used / self.cache.total

    def submit(self, request: SimRequest) -> SimRequest:
        """The request arrives now. Raises ValueError if it can never fit this replica."""
        if request.state != NEW:
            raise ValueError(f"{request.request_id} was already submitted")
        if request.prompt.block_size != self.block_size:
            raise ValueError(
                f"prompt uses {request.prompt.block_size}-token blocks, engine {self.block_size}"
            )
        total = request.prompt_tokens + request.output_len
        max_len = self.profile.model.max_model_len
        if total > max_len:
            raise ValueError(
                f"prompt ({request.prompt_tokens}) + output ({request.output_len}) tokens "
                f"exceed the model's context length {max_len}"
            )
        if -(-(total - 1) // self.block_size) > self.cache.total:
            raise ValueError(
                f"{total} tokens exceed this replica's KV capacity of "
                f"{self.cache.total * self.block_size} tokens"
            )
        now = self.clock.now()
        request.arrival_time = now
        request.replica = self.name
        request._seq = next(self._seqs)
        if self.policy == "fcfs":
            request._sort_key = (now,)
        elif self.policy == "priority":
            request._sort_key = (float(request.priority), now)
        else:
            pid = request.program_id
            first = self._program_first.setdefault(pid, now) if pid is not None else now
            request._sort_key = (first, now)
        if request.on_token is not None:
            self._watched.add(request)
        self.submitted += 1
        self._enqueue(request)
        if self._busy:
            self._interrupt()
        else:
            self._request_plan()
        return request

    def submit_at(self, at: float, request: SimRequest) -> SimRequest:
        """Schedule `request` to arrive at virtual time `at`."""

        def arrive() -> None:
            self.submit(request)

        self.clock.schedule(at, arrive)
        return request

    def release_pins(self, key: str) -> int:
        """Release every pin held under `key` (a program id); returns how many."""
        pins = list(self._pins.get(key, ()))
        for pin in pins:
            self._release_pin(pin, "api")
        return len(pins)

    def abort(self, request: SimRequest) -> bool:
        """Stop `request` (a client went away): its blocks are freed (cached ones stay
        cached), no pin is set, `on_finish` is not called. False if it already finished.

        A running request is taken out at the end of the step in flight (its blocks for
        that step are already allocated); it reports `aborted` at once."""
        if request.state == FINISHED or request.state == NEW or request.aborted:
            return False
        request.aborted = True
        if request.state != WAITING and self._busy:
            self._abort_later.append(request)
            self._interrupt()  # the batch changes shape at the end of this step
        else:
            self._abort_now(request)
        return True

    def _abort_now(self, request: SimRequest) -> None:
        if request.state == WAITING:
            self._take_waiting(request)  # its queue entries are skipped from now on
        elif request.state == DECODE:
            self._register(request, self._leave_decode(request))
        elif request.state == PREFILL:
            del self._pre[request._seq]
        else:
            return
        self._free_blocks(request)
        request.state = FINISHED
        request.finish_time = self.clock.now()
        self._watched.discard(request)
        self.n_aborted += 1
        if self._n_waiting:
            self._request_plan()

    def pinned_programs(self) -> list[str]:
        return list(self._pins)

    def probe(self, prompt: Prompt) -> int:
        """Tokens of `prompt` a request scheduled now would take from the prefix cache."""
        blocks = self.cache.probe(prompt.keys, prompt.ends, prompt.num_tokens // self.block_size)
        return min(blocks * self.block_size, max(0, prompt.num_tokens - 1))

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(
            name=self.name,
            time=self.clock.now(),
            running=self.num_running,
            waiting=self._n_waiting,
            kv_usage=self.kv_usage,
            kv_capacity_blocks=self.cache.total,
            pinned_blocks=self.cache.pinned_blocks,
            prefix_queries_tokens=self.prefix_queries,
            prefix_hits_tokens=self.prefix_hits,
            pins_active=self.pins_active,
            pins_set=self.pins_set,
            pins_released=self.pins_released,
            pins_expired=self.pins_expired,
            pins_refused=self.pins_refused,
            preemptions=self.preemptions,
            recomputed_tokens=self.recomputed,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            submitted=self.submitted,
            finished=self.n_finished,
            aborted=self.n_aborted,
            steps=self.steps,
            busy_s=self.busy_s,
            evicted_blocks=self.cache.evicted_blocks,
        )

    def decoded_tokens(self, request: SimRequest) -> int:
        """Output tokens `request` has generated so far (exact even mid-decode)."""
        if request.state == DECODE:
            return request._g0 + self._S - request._S0
        return request.output_tokens

    # -- waiting queue ---------------------------------------------------------------------

    def _enqueue(self, r: SimRequest) -> None:
        r.state = WAITING
        r._wait_epoch += 1
        entry = (r._sort_key, r._seq, r._wait_epoch, r)
        heapq.heappush(self._wq, entry)
        self._n_waiting += 1
        pid = r.program_id
        if self.policy == "program" and pid is not None:
            self._waiting_by_program.setdefault(pid, set()).add(r)
            if pid in self._pins:
                heapq.heappush(self._pinned_wq, entry)

    def _peek_waiting(self) -> SimRequest | None:
        if self.policy == "program":
            pq = self._pinned_wq
            while pq:
                _, _, epoch, r = pq[0]
                if r.state != WAITING or r._wait_epoch != epoch or r.program_id not in self._pins:
                    heapq.heappop(pq)
                    continue
                return r
        wq = self._wq
        while wq:
            _, _, epoch, r = wq[0]
            if r.state != WAITING or r._wait_epoch != epoch:
                heapq.heappop(wq)
                continue
            return r
        return None

    def _take_waiting(self, r: SimRequest) -> None:
        self._n_waiting -= 1
        if self.policy == "program" and r.program_id is not None:
            waiting = self._waiting_by_program[r.program_id]
            waiting.discard(r)
            if not waiting:
                del self._waiting_by_program[r.program_id]

    # -- planning a step -------------------------------------------------------------------

    def _request_plan(self) -> None:
        """Plan a step once everything due now has happened (same-time arrivals batch)."""
        if self._busy or self._plan_pending or self._planning:
            return
        self._plan_pending = True
        self.clock.call_later(0.0, self._plan)

    def _make_room(self, need: int, matched: list[CacheEntry] | None = None) -> bool:
        """Whether `need` blocks can be allocated (besides acquiring `matched`), releasing
        pins first when the pressure policy allows."""
        cache = self.cache
        while True:
            touched = cache.evictable_in(matched) if matched else 0
            if need + touched <= cache.available:
                return True
            if self.config.pin_pressure != "release" or not self.pins_active:
                return False
            pin = min((p for ps in self._pins.values() for p in ps), key=lambda p: p.deadline)
            self._release_pin(pin, "pressure")

    def _victim(self) -> SimRequest:
        """The running request to preempt: last in policy order (latest arrival first)."""
        best: SimRequest | None = None
        for group in (self._dec, self._pre):
            for r in group.values():
                if best is None or (r._sort_key, r._seq) > (best._sort_key, best._seq):
                    best = r
        assert best is not None
        return best

    def _plan(self) -> None:
        self._plan_pending = False
        if self._busy:
            return
        self._planning = True
        try:
            self._plan_step()
        finally:
            self._planning = False

    def _plan_step(self) -> None:
        cache = self.cache
        bs = self.block_size
        dec = self._dec
        pre = self._pre
        S = self._S
        # 1. Running requests: one token per decoder, then prefill chunks in order. If their
        #    blocks do not fit, preempt the lowest-priority running request and retry.
        preempted = False
        while True:
            budget = self.max_num_batched_tokens - len(dec)
            need = self._decode_need(S, 1) if dec else 0
            plan: list[tuple[SimRequest, int, int]] = []
            for r in pre.values():
                if budget <= 0:
                    break
                c = min(r._target - r._computed, budget)
                budget -= c
                extra = -(-(r._computed + c) // bs) - r._held_blocks - r._private
                if extra < 0:
                    extra = 0
                need += extra
                plan.append((r, c, extra))
            if self._make_room(need):
                break
            self._preempt(self._victim())
            preempted = True
        cache.allocate(need)
        chunks: list[tuple[SimRequest, int]] = []
        for r, c, extra in plan:
            r._private += extra
            chunks.append((r, c))
        # 2. Admit waiting requests in policy order while budget, seats and blocks last
        #    (not in a step that had to preempt: memory is short, as vLLM).
        n_running = len(dec) + len(pre)
        while not preempted and budget > 0 and n_running < self.max_num_seqs and self._n_waiting:
            head = self._peek_waiting()
            assert head is not None
            r = head
            target = r._target
            if r._keys:
                matched, mblocks = cache.match(r._keys, r._ends, target // bs)
            else:
                matched, mblocks = [], 0
            hit = min(mblocks * bs, target - 1)
            c = min(target - hit, budget)
            extra = max(0, -(-(hit + c) // bs) - mblocks)
            if not self._make_room(extra, matched):
                if self._peek_waiting() is not r:
                    continue  # released pins reordered the queue (program policy)
                break
            self._take_waiting(r)
            cache.acquire(matched)
            cache.allocate(extra)
            r.state = PREFILL
            r._held = matched
            r._n_held = len(matched)
            r._held_blocks = mblocks
            r._private = extra
            r._computed = hit
            pre[r._seq] = r
            self.prefix_queries += target
            self.prefix_hits += hit
            if r.cached_tokens is None:
                r.cached_tokens = hit
            if r.program_id is not None and r.program_id in self._pins:
                # The program's next step runs: it holds the blocks it needs itself now.
                for pin in list(self._pins[r.program_id]):
                    self._release_pin(pin, "next_request")
            chunks.append((r, c))
            budget -= c
            n_running += 1
        # 3. Launch the step (or a run of identical decode steps).
        B = len(dec)
        if not chunks and not B:
            return  # idle; an arrival or a pin release plans again
        now = self.clock.now()
        sum_ctx = self._dec_base + B * S
        if chunks:
            tokens = B
            attn = float(sum_ctx + B)
            read = sum_ctx
            for r, c in chunks:
                a = r._computed
                tokens += c
                attn += c * a + c * (c + 1) / 2.0
                read += a
            dt = self._oh + max(
                self._c_tok * tokens + self._c_attn * attn,
                self._c_w + self._c_kv * (read + tokens),
            )
            k = 1
        else:
            a0 = self._c_tok * B + self._c_attn * (sum_ctx + B)
            c0 = self._c_w + self._c_kv * (sum_ctx + B)
            self._coef = (a0, self._c_attn * B, c0, self._c_kv * B)
            k = 1 if preempted else self._jump_length(S)
            dt = self._span(k)
        self._chunks = chunks
        self._k = k
        self._t0 = now
        self._busy = True
        self._timer = self.clock.schedule(now + dt, self._end_step)
        if self.on_step is not None:
            self.on_step(StepInfo(now, now + dt, k, B, sum(c for _, c in chunks), len(chunks)))

    def _jump_length(self, S: int) -> int:
        """How many identical decode steps can run before anything changes."""
        if self._watched:
            return 1
        heap = self._dec_heap
        while heap and (heap[0][3]._dec_epoch != heap[0][2] or heap[0][3].state != DECODE):
            heapq.heappop(heap)
        k = heap[0][0] - S
        k = min(k, 1 + self._decode_steps_fitting(S + 1, self.cache.available))
        if self.config.max_jump_steps is not None:
            k = min(k, self.config.max_jump_steps)
        return max(1, k)

    def _span(self, j: int) -> float:
        """Duration of the first `j` steps of the current decode run."""
        a, b, c, e = self._coef
        return j * self._oh + sum_max_linear(a, b, c, e, j)

    def _interrupt(self) -> None:
        """Something changed mid-run: end the run at the step now in progress."""
        if not self._busy or self._k <= 1 or self._timer is None:
            return
        tau = self.clock.now() - self._t0
        lo, hi = 1, self._k
        while lo < hi:
            mid = (lo + hi) // 2
            if self._span(mid) >= tau:
                hi = mid
            else:
                lo = mid + 1
        if lo < self._k:
            self._timer.cancel()
            self._k = lo
            self._timer = self.clock.schedule(self._t0 + self._span(lo), self._end_step)

    # -- decode bookkeeping ----------------------------------------------------------------

    def _decode_need(self, S: int, k: int) -> int:
        """New blocks the decoders need over steps S .. S+k-1 (a decoder whose context is
        a multiple of the block size needs one before writing its next token)."""
        bs = self.block_size
        cnt = self._cnt
        total = 0
        if k >= bs:
            full, k = divmod(k, bs)
            total = full * len(self._dec)
            S += full * bs
        for i in range(k):
            total += cnt[(-(S + i)) % bs]
        return total

    def _decode_steps_fitting(self, S: int, avail: int) -> int:
        """The most decode steps from S whose new blocks fit in `avail`."""
        B = len(self._dec)
        bs = self.block_size
        full = avail // B
        k = full * bs
        rem = avail - full * B
        s = S + k
        cnt = self._cnt
        for i in range(bs):
            n = cnt[(-(s + i)) % bs]
            if n > rem:
                break
            rem -= n
            k += 1
        return k

    def _join_decode(self, r: SimRequest, L: int) -> None:
        S = self._S
        r.state = DECODE
        r._dec_epoch += 1
        r._L0 = L
        r._g0 = r.output_tokens
        r._S0 = S
        c = (L - S) % self.block_size
        r._dec_c = c
        self._cnt[c] += 1
        self._dec_base += L - S
        self._dec[r._seq] = r
        heapq.heappush(
            self._dec_heap, (S + r.output_len - r.output_tokens, r._seq, r._dec_epoch, r)
        )

    def _leave_decode(self, r: SimRequest) -> int:
        """Take `r` out of the decode group; returns its context length (tokens of KV)."""
        d = self._S - r._S0
        L = r._L0 + d
        r.output_tokens = r._g0 + d
        self._cnt[r._dec_c] -= 1
        self._dec_base -= r._L0 - r._S0
        del self._dec[r._seq]
        r._private = -(-L // self.block_size) - r._held_blocks
        return L

    def _register(self, r: SimRequest, upto: int) -> None:
        """Register `r`'s extents that its first `upto` tokens complete."""
        ends = r._ends
        keys = r._keys
        i = r._n_held
        limit = upto // self.block_size
        prev = ends[i - 1] if i else 0
        cache = self.cache
        held = r._held
        while i < len(ends) and ends[i] <= limit:
            nb = ends[i] - prev
            held.append(cache.register(keys[i], nb))
            r._private -= nb
            prev = ends[i]
            i += 1
        r._n_held = i
        r._held_blocks = prev

    def _free_blocks(self, r: SimRequest) -> None:
        """Drop `r`'s references and private blocks (its cached extents stay cached)."""
        self.cache.release(r._held)
        self.cache.free_private(r._private)
        r._held = []
        r._private = 0

    # -- ending a step ---------------------------------------------------------------------

    def _end_step(self) -> None:
        self._timer = None
        k = self._k
        cache = self.cache
        B = len(self._dec)
        now = self.clock.now()
        self.busy_s += now - self._t0
        self.steps += k
        if B:
            if k > 1:
                cache.allocate(self._decode_need(self._S + 1, k - 1))
            self._S += k
            self.generation_tokens += B * k
        S = self._S
        chunks = self._chunks
        self._chunks = []
        if self._abort_later:
            for r in self._abort_later:
                self._abort_now(r)
            self._abort_later.clear()
        for r, c in chunks:
            if r.state != PREFILL:
                continue  # aborted
            a = r._computed
            b = a + c
            if r._watermark > a:
                again = min(b, r._watermark) - a
                r.recomputed_tokens += again
                self.recomputed += again
            self.prompt_tokens += c
            r._computed = b
            if r._n_held < len(r._ends) and r._ends[r._n_held] * self.block_size <= b:
                self._register(r, b)
            if b == r._target:
                del self._pre[r._seq]
                r.output_tokens += 1
                self.generation_tokens += 1
                if r.first_token_time is None:
                    r.first_token_time = now
                    if r.on_first_token is not None:
                        r.on_first_token(r)
                if r.output_tokens >= r.output_len:
                    self._finish(r, b)
                else:
                    self._join_decode(r, b)
        heap = self._dec_heap
        while heap and heap[0][0] <= S:
            _, _, epoch, r = heapq.heappop(heap)
            if r._dec_epoch != epoch or r.state != DECODE:
                continue
            self._finish(r, self._leave_decode(r))
        if self._watched:
            for r in list(self._watched):
                if r.state == DECODE:
                    r.output_tokens = r._g0 + S - r._S0
                if r.output_tokens != r._reported and r.on_token is not None:
                    r._reported = r.output_tokens
                    r.on_token(r)
        self._busy = False
        self._plan()

    def _finish(self, r: SimRequest, L: int) -> None:
        r.state = FINISHED
        r.finish_time = self.clock.now()
        self._register(r, L)
        if r.pin_ttl_s is not None and not r.is_last_step and r._held:
            self._pin(r)
        self._free_blocks(r)
        self.n_finished += 1
        if self.config.keep_finished:
            self.finished.append(r)
        if r in self._watched:
            self._watched.discard(r)
            if r.on_token is not None and r.output_tokens != r._reported:
                r._reported = r.output_tokens
                r.on_token(r)
        if r.on_finish is not None:
            r.on_finish(r)

    def _preempt(self, r: SimRequest) -> None:
        if r.state == DECODE:
            L = self._leave_decode(r)
            self._register(r, L)
        else:
            L = r._computed
            del self._pre[r._seq]
        self._free_blocks(r)
        r._n_held = 0
        r._held_blocks = 0
        r._computed = 0
        r._watermark = max(r._watermark, L)
        r._target = r.prompt_tokens + r.output_tokens
        r.num_preemptions += 1
        self.preemptions += 1
        self._enqueue(r)

    # -- pins ------------------------------------------------------------------------------

    def _pin(self, r: SimRequest) -> None:
        assert r.pin_ttl_s is not None
        key = r.program_id if r.program_id is not None else r.request_id
        cache = self.cache
        entries = list(r._held)
        added = cache.newly_pinned_blocks(entries)
        if cache.pinned_blocks + added > self.config.max_pinned_fraction * cache.total:
            self.pins_refused += 1
            return
        cache.pin(entries)
        pin = _Pin(key, entries, self.clock.now() + r.pin_ttl_s)
        pin.timer = self.clock.schedule(pin.deadline, lambda: self._release_pin(pin, "expired"))
        self._pins.setdefault(key, []).append(pin)
        self.pins_set += 1
        self.pins_active += 1
        if self.policy == "program":
            for w in self._waiting_by_program.get(key, ()):
                heapq.heappush(self._pinned_wq, (w._sort_key, w._seq, w._wait_epoch, w))

    def _release_pin(self, pin: _Pin, reason: str) -> None:
        if not pin.active:
            return
        pin.active = False
        if pin.timer is not None and reason != "expired":
            pin.timer.cancel()
        self.cache.unpin(pin.entries)
        pins = self._pins[pin.key]
        pins.remove(pin)
        if not pins:
            del self._pins[pin.key]
        self.pins_active -= 1
        self.pins_released += 1
        if reason == "expired":
            self.pins_expired += 1
        # Freed blocks may let a waiting request in.
        if self._n_waiting and not self._planning:
            if self._busy:
                self._interrupt()
            else:
                self._request_plan()
