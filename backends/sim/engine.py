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
    EngineConfig(policy, pin_pressure="keep", pin_release="scheduled",
                 max_pinned_fraction=0.5, max_num_seqs=None, max_num_batched_tokens=None,
                 kv_capacity_blocks=None, max_jump_steps=None, keep_finished=False)
                                       # (config.py; None: from the profile)

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
- **Step time**: `Profile.step_time` (a roofline per kernel: the GEMMs against the
  weights, attention against the KV it reads, once per query tile of each chunk) over the
  step's tokens, attention context and KV reads.
- **Policies** (`EngineConfig.policy`, `waiting.py`): `fcfs` (arrival order), `priority`
  (lower `priority` first, then arrival; vLLM), `program` (vllm-continuum: waiting requests
  of a program that holds a pin first, then by the arrival of the request's program, then
  the request's arrival). Preemption victims are the last in the same order; under
  `program` a request that is not its program's last step is chosen before one that is
  (vllm-continuum's `pop_running_request_based_on_last_step`).
- **Pins** (`pin_ttl_s`): when a request with a pin TTL finishes, the blocks of its whole
  sequence are pinned for that long under its `program_id` (its request id when it has
  none): they count toward memory and cannot be evicted. A request with `is_last_step`
  sets none. A pin is released:
  1. by the program's next request: when it is *scheduled* (`pin_release="scheduled"`: it
     then holds the blocks itself) or when it *finishes* (`"finished"`, vllm-continuum's
     `_free_blocks`); a request with `is_last_step` releases its program's pins the same
     way;
  2. at its deadline, unless a request of its program is waiting in this engine: then the
     pin is held until that request leaves the waiting queue (vllm-continuum's
     `unpin_requests_regular` releases only pins whose job has nothing waiting);
  3. on demand, `release_pins(key)`;
  4. under memory pressure, by `pin_pressure`: `"keep"` never (waiting requests wait and
     running ones are preempted as if pinned blocks were in use); `"release"` earliest
     deadline first whenever an allocation would otherwise fail, before anyone is
     preempted; `"last_resort"` (vllm-continuum) the pin with the *latest* deadline, and
     only when nothing else can give way: a running request's allocation fails while at
     most one request runs, or a waiting one's while none runs.
  A new pin that would take pinned blocks over `max_pinned_fraction` of capacity is
  refused (counted in `pins_refused`; 1.0 means no cap, as in vllm-continuum).

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
from collections.abc import Callable

from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import Clock, Timer
from treadle.backends.sim.config import (
    SCHEDULING_POLICIES,
    EngineConfig,
    EngineMetrics,
    PinPressure,
    PinRelease,
    SchedulingPolicy,
    StepInfo,
)
from treadle.backends.sim.kvcache import BlockCache, CacheEntry
from treadle.backends.sim.pins import PinTable
from treadle.backends.sim.profile import Profile, sum_max_linear
from treadle.backends.sim.request import DECODE, FINISHED, NEW, PREFILL, WAITING, SimRequest
from treadle.backends.sim.waiting import WaitQueue

__all__ = [
    "SCHEDULING_POLICIES",
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "PinPressure",
    "PinRelease",
    "SchedulingPolicy",
    "SimRequest",
    "StepInfo",
    "sum_max_linear",
]


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
        self._release_on_schedule = cfg.pin_release == "scheduled"
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
        self._oh = profile.efficiency.step_overhead_s
        self._c_tok, self._c_attn, self._c_w, self._c_kv = profile.step_coefficients
        # running requests
        self._pre: dict[int, SimRequest] = {}  # prefilling, in admission order
        self._dec: dict[int, SimRequest] = {}  # decoding (aggregate form)
        self._S = 0  # decode steps so far
        self._cnt = [0] * self.block_size  # decoders by block phase
        self._dec_base = 0  # sum over decoders of (L0 - S0): sum of contexts = base + B*S
        self._dec_heap: list[tuple[int, int, int, SimRequest]] = []
        self._watched: set[SimRequest] = set()
        # pins (by program) and the waiting queue, which puts pinned programs first
        self.pins = PinTable(
            self.cache,
            clock,
            max_fraction=cfg.max_pinned_fraction,
            holds=lambda key: self._waiting.has_program(key),
            on_release=self._pin_released,
        )
        self._waiting = WaitQueue(cfg.policy, self.pins)
        # the step in flight
        self._busy = False
        self._planning = False
        self._plan_pending = False
        self._timer: Timer | None = None
        self._t0 = 0.0
        self._k = 0
        self._coef = (0.0, 0.0, 0.0, 0.0)
        self._gemm = 0.0
        self._chunks: list[tuple[SimRequest, int]] = []
        self._abort_later: list[SimRequest] = []
        self._seqs = itertools.count(1)
        # counters
        self.submitted = 0
        self.n_finished = 0
        self.n_aborted = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
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
        return self._waiting.count

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
        request._sort_key = self._waiting.sort_key(request, now)
        if request.on_token is not None:
            self._watched.add(request)
        self.submitted += 1
        self._waiting.push(request)
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
        return self.pins.release_program(key, "api")

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
            self._leave_waiting(request)  # its queue entries are skipped from now on
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
        if self._waiting.count:
            self._request_plan()

    def pinned_programs(self) -> list[str]:
        return self.pins.programs()

    def probe(self, prompt: Prompt) -> int:
        """Tokens of `prompt` a request scheduled now would take from the prefix cache."""
        blocks = self.cache.probe(prompt.keys, prompt.ends, prompt.num_tokens // self.block_size)
        return min(blocks * self.block_size, max(0, prompt.num_tokens - 1))

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(
            name=self.name,
            time=self.clock.now(),
            running=self.num_running,
            waiting=self._waiting.count,
            kv_usage=self.kv_usage,
            kv_capacity_blocks=self.cache.total,
            pinned_blocks=self.cache.pinned_blocks,
            prefix_queries_tokens=self.prefix_queries,
            prefix_hits_tokens=self.prefix_hits,
            pins_active=self.pins.active,
            pins_set=self.pins.set_count,
            pins_released=self.pins.released,
            pins_expired=self.pins.expired,
            pins_refused=self.pins.refused,
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

    def _leave_waiting(self, r: SimRequest) -> None:
        """`r` leaves the waiting queue; a pin held only because it waited goes now."""
        self._waiting.take(r)
        pid = r.program_id
        if pid is not None and not self._waiting.has_program(pid):
            self.pins.waiting_left(pid)

    # -- planning a step -------------------------------------------------------------------

    def _request_plan(self) -> None:
        """Plan a step once everything due now has happened (same-time arrivals batch)."""
        if self._busy or self._plan_pending or self._planning:
            return
        self._plan_pending = True
        self.clock.call_later(0.0, self._plan)

    def _make_room(
        self, need: int, matched: list[CacheEntry] | None = None, *, others_can_yield: bool
    ) -> bool:
        """Whether `need` blocks can be allocated (besides acquiring `matched`), releasing
        pins first when the pressure policy allows (`others_can_yield`: someone else could
        give way instead: another running request to preempt, or one to wait for)."""
        cache = self.cache
        mode = self.config.pin_pressure
        while True:
            touched = cache.evictable_in(matched) if matched else 0
            if need + touched <= cache.available:
                return True
            if not self.pins.active or mode == "keep":
                return False
            pins = iter(self.pins)
            if mode == "release":
                pin = min(pins, key=lambda p: p.deadline)
            elif not others_can_yield:  # last_resort: the longest retained KV goes
                pin = max(pins, key=lambda p: p.deadline)
            else:
                return False
            self.pins.release(pin, "pressure")

    def _victim(self) -> SimRequest:
        """The running request to preempt: last in policy order (latest arrival first);
        under `program`, one that is not its program's last step if there is one."""
        prefer_steps = self.policy == "program"
        best: SimRequest | None = None
        best_key: tuple[object, ...] = ()
        for group in (self._dec, self._pre):
            for r in group.values():
                key = (prefer_steps and not r.is_last_step, r._sort_key, r._seq)
                if best is None or key > best_key:
                    best, best_key = r, key
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
            if self._make_room(need, others_can_yield=len(dec) + len(pre) > 1):
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
        waiting = self._waiting
        while not preempted and budget > 0 and n_running < self.max_num_seqs and waiting.count:
            head = waiting.peek()
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
            if not self._make_room(extra, matched, others_can_yield=n_running > 0):
                if waiting.peek() is not r:
                    continue  # released pins reordered the queue (program policy)
                break
            self._leave_waiting(r)
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
            pid = r.program_id
            if self._release_on_schedule and pid is not None and pid in self.pins:
                # The program's next step runs: it holds the blocks it needs itself now.
                self.pins.release_program(pid, "next_request")
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
            read = float(sum_ctx)
            kv_read = self.profile.kv_read_tokens
            for r, c in chunks:
                a = r._computed
                tokens += c
                attn += c * a + c * (c + 1) / 2.0
                read += kv_read(c, a)
            dt = (
                self._oh
                + max(self._c_tok * tokens, self._c_w)
                + max(self._c_attn * attn, self._c_kv * (read + tokens))
            )
            k = 1
        else:
            # the GEMMs' time is the same every step of the run; attention's grows with
            # the contexts
            self._gemm = max(self._c_tok * B, self._c_w)
            a0 = self._c_attn * (sum_ctx + B)
            c0 = self._c_kv * (sum_ctx + B)
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
        return j * (self._oh + self._gemm) + sum_max_linear(a, b, c, e, j)

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
        pid = r.program_id
        if not self._release_on_schedule and pid is not None and pid in self.pins:
            # vllm-continuum: the job's next request is done; its own pin replaces the old
            self.pins.release_program(pid, "next_request")
        if r.pin_ttl_s is not None and not r.is_last_step and r._held:
            key = r.program_id if r.program_id is not None else r.request_id
            if self.pins.pin(key, list(r._held), r.pin_ttl_s) is not None:
                self._waiting.program_pinned(key)
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
        self._waiting.push(r)

    # -- pins ------------------------------------------------------------------------------

    def _pin_released(self) -> None:
        """Freed blocks may let a waiting request in."""
        if self._waiting.count and not self._planning:
            if self._busy:
                self._interrupt()
            else:
                self._request_plan()
