"""Workload generators for `treadle bench agents`: agent programs as DAGs of LLM calls.

A program is a list of `CallSpec`s. Each call's prompt is either a *continuation* — the
whole sequence (prompt + output) of an earlier call of the same program, followed by new
segments (a tool's output, a user turn) — or *fresh* segments (an agent's system prompt,
the task, other agents' messages). Content is named by integer keys (equal key = equal
tokens), which is what the simulator's prefix cache needs (`Prompt.from_segments`); ints
hash the same in every process, so a seed gives the same run everywhere. After a call the
program may run a tool for `tool_s` seconds; calls that depend on it start when it returns.

Programs are generated once per (workload, seed) with arrival times of a unit-rate Poisson
process; a load point scales them by 1 / rate, so every system and every load sees the same
programs in the same order.

Generators (parameters are in `Workload.params` and printed by the benchmark):

- `swe` — coding agents (one ReAct loop): turns lognormal (mean 40); every turn decodes
  100-300 tokens, runs one tool and appends its output (300-2,000 tokens, log-uniform) to
  the context. Tool durations: about 72 % under 1 s (view, search, edit), 25 % 1-10 s
  (run a script, git), 3 % 10-120 s (tests). The final turn answers without a tool.
- `bfcl` — function-calling sessions with Autellix's BFCL statistics: about 10.75 calls per
  program, 735 prompt and 34 output tokens per call; short tools (50-500 ms).
- `multiagent` — KVFlow-style workflows: five agents with fixed system prompts of 2-6k
  tokens (shared by every workflow) take turns in a fixed step graph with two parallel
  branches; some steps call a tool; many workflows at once.
- `mixed` — three tenants at once with weights 2 : 1 : 1: `coders` and `reviewers` run
  coding agents (`swe`), `teams` run multi-agent workflows; their arrival rates are set so
  that they demand 40 / 30 / 30 % of the expected GPU work: under overload (1.5 x capacity)
  each wants more than its weight's share (50 / 25 / 25 %), and gets that share only if the
  scheduler enforces it (first-come-first-served would serve them 40 / 30 / 30).

The scheduler's static knowledge of a program is what `graphs.analysis` would derive from
its DAG: a ReAct loop (`swe`, `bfcl`) is one `llm` node with tools, so neither its length
nor which turn is the last is known in advance; the `multiagent` step graph is explicit,
so every call knows its remaining critical path and whether it is the last LLM step.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: seconds an LLM step is estimated at before measurement (graphs.analysis.LLM_STEP_COST_S)
LLM_STEP_COST_S = 1.0

Segment = tuple[int, int]  # (content key, tokens)


@dataclass(frozen=True, slots=True)
class ToolKind:
    """A tool of a workload: its declared expected duration and its true distribution."""

    name: str
    declared_s: float
    sample: Callable[[random.Random], float]
    #: the distribution in words (printed with the parameters)
    describe: str


@dataclass(frozen=True, slots=True)
class CallSpec:
    index: int
    #: calls (and their tools) that must finish before this call starts
    deps: tuple[int, ...]
    #: the call whose sequence (prompt + output) this prompt continues; None: fresh
    base: int | None
    #: segments after the base sequence (or the whole prompt when fresh)
    append: tuple[Segment, ...]
    prompt_tokens: int
    output_tokens: int
    output_key: int
    #: the tool run after this call (None: none)
    tool: str | None
    tool_s: float
    #: static facts (graphs.analysis): estimated work from this call to the end, and whether
    #: it is known to be the last LLM step
    remaining_cost_s: float
    is_last_step: bool
    agent: str | None = None
    #: a later call continues this call's sequence (the same conversation goes on after
    #: the tool): static for a ReAct loop; a step graph's next node starts a new prompt
    continues: bool = False
    #: a person answers before the calls after this one start (agent-session traces: the
    #: gap between a turn's end and the next turn's first call); not known in advance
    human_wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    pid: int
    name: str
    tenant: str
    kind: str
    #: arrival time of a unit-rate process (scaled by 1 / rate at a load point)
    arrival_unit: float
    calls: tuple[CallSpec, ...]

    @property
    def dependents(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {c.index: [] for c in self.calls}
        for c in self.calls:
            for d in c.deps:
                out[d].append(c.index)
        return out


@dataclass
class Workload:
    name: str
    seed: int
    params: dict[str, Any]
    programs: list[ProgramSpec]
    tools: dict[str, ToolKind]
    tenants: dict[str, float] = field(default_factory=lambda: {"default": 1.0})
    #: segment keys of prompts shared by many programs (system prompts), with lengths
    shared_segments: dict[int, int] = field(default_factory=dict)

    @property
    def declared_durations(self) -> dict[str, float]:
        return {t.name: t.declared_s for t in self.tools.values()}


# -- distributions ---------------------------------------------------------------------


def _loguniform(lo: float, hi: float) -> Callable[[random.Random], float]:
    return lambda rng: math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _uniform(lo: float, hi: float) -> Callable[[random.Random], float]:
    return lambda rng: rng.uniform(lo, hi)


def clipped_lognormal(
    median: float, sigma: float, lo: float, hi: float
) -> Callable[[random.Random], float]:
    return lambda rng: min(hi, max(lo, rng.lognormvariate(math.log(median), sigma)))


def lognormal_int(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))))


class Keys:
    """Content keys: fixed ones for shared prompts, fresh ones for everything else."""

    def __init__(self, start: int = 1_000_000):
        self._next = itertools.count(start)

    def fresh(self) -> int:
        return next(self._next)


def _pick(rng: random.Random, weighted: list[tuple[str, float]]) -> str:
    x = rng.random() * sum(w for _, w in weighted)
    for name, w in weighted:
        x -= w
        if x <= 0:
            return name
    return weighted[-1][0]


# -- swe -------------------------------------------------------------------------------

SWE_TOOLS = {
    "view_file": ToolKind("view_file", 0.2, _uniform(0.05, 0.3), "uniform 0.05-0.3 s"),
    "search": ToolKind("search", 0.5, _uniform(0.2, 1.0), "uniform 0.2-1 s"),
    "edit_file": ToolKind("edit_file", 0.2, _uniform(0.05, 0.4), "uniform 0.05-0.4 s"),
    "run_python": ToolKind("run_python", 3.0, _loguniform(1.0, 10.0), "log-uniform 1-10 s"),
    "git": ToolKind("git", 2.0, _loguniform(1.0, 4.0), "log-uniform 1-4 s"),
    "run_tests": ToolKind(
        "run_tests", 30.0, clipped_lognormal(20.0, 0.7, 10.0, 120.0), "lognormal 20 s, 10-120 s"
    ),
}
SWE_MIX = [
    ("view_file", 0.30),
    ("search", 0.22),
    ("edit_file", 0.20),
    ("run_python", 0.13),
    ("git", 0.12),
    ("run_tests", 0.03),
]
SWE_SYSTEM_KEY = 1
SWE_SYSTEM_TOKENS = 1800
SWE_MAX_CONTEXT = 120_000
SWE_PARAMS: dict[str, Any] = {
    "turns": "lognormal mean 40, sigma 0.7, 3..120 (ends early at the context limit)",
    "system_prompt_tokens": SWE_SYSTEM_TOKENS,
    "issue_tokens": "lognormal median 1000, sigma 0.5, 300..3000",
    "output_tokens_per_turn": "uniform 100..300",
    "tool_output_tokens": "log-uniform 300..2000",
    "max_context_tokens": SWE_MAX_CONTEXT,
    "tool_mix": {name: w for name, w in SWE_MIX},
}


def chain_program(
    pid: int,
    tenant: str,
    kind: str,
    arrival: float,
    first: tuple[Segment, ...],
    turns: list[tuple[int, str | None, float, int]],
    keys: Keys,
    *,
    human_waits: dict[int, float] | None = None,
) -> ProgramSpec:
    """A ReAct loop: turn k (output tokens, tool, tool seconds, tool output tokens)
    continues turn k-1's sequence with its tool's output; after a turn in `human_waits` a
    person answers (that long, with the tool output tokens as their message) and the
    conversation goes on."""
    calls: list[CallSpec] = []
    prompt_tokens = sum(n for _, n in first)
    append: tuple[Segment, ...] = first
    waits = human_waits or {}
    for k, (out, tool, tool_s, tool_out) in enumerate(turns):
        goes_on = tool is not None or k in waits
        calls.append(
            CallSpec(
                index=k,
                deps=(k - 1,) if k else (),
                base=k - 1 if k else None,
                append=append,
                prompt_tokens=prompt_tokens,
                output_tokens=out,
                output_key=keys.fresh(),
                tool=tool,
                tool_s=tool_s if tool else 0.0,
                # one llm node with tools: its length is unknown, its last turn too
                remaining_cost_s=LLM_STEP_COST_S,
                is_last_step=False,
                continues=goes_on,
                human_wait_s=waits.get(k, 0.0),
            )
        )
        if goes_on:
            append = ((keys.fresh(), tool_out),)
            prompt_tokens += out + tool_out
    return ProgramSpec(pid, f"{kind}-{pid}", tenant, kind, arrival, tuple(calls))


def _swe_program(
    pid: int, tenant: str, arrival: float, rng: random.Random, keys: Keys
) -> ProgramSpec:
    n_turns = lognormal_int(rng, 40.0, 0.7, 3, 120)
    issue = int(clipped_lognormal(1000, 0.5, 300, 3000)(rng))
    ctx = SWE_SYSTEM_TOKENS + issue
    turns: list[tuple[int, str | None, float, int]] = []
    tool_sample = _loguniform(300, 2000)
    for k in range(n_turns):
        out = rng.randint(100, 300)
        tool_out = int(tool_sample(rng))
        last = k == n_turns - 1 or ctx + out + tool_out + 300 > SWE_MAX_CONTEXT
        if last:
            turns.append((out, None, 0.0, 0))
            break
        name = _pick(rng, SWE_MIX)
        turns.append((out, name, SWE_TOOLS[name].sample(rng), tool_out))
        ctx += out + tool_out
    first = ((SWE_SYSTEM_KEY, SWE_SYSTEM_TOKENS), (keys.fresh(), issue))
    return chain_program(pid, tenant, "swe", arrival, first, turns, keys)


# -- bfcl ------------------------------------------------------------------------------

BFCL_TOOLS = {
    "api_call": ToolKind("api_call", 0.2, _loguniform(0.05, 0.5), "log-uniform 0.05-0.5 s"),
    "fs_op": ToolKind("fs_op", 0.1, _loguniform(0.05, 0.3), "log-uniform 0.05-0.3 s"),
}
BFCL_PARAMS: dict[str, Any] = {
    "calls_per_program": "lognormal mean 10.75, sigma 0.5, 1..40 (Autellix BFCL)",
    "function_docs_tokens": "uniform 230..330 (per session)",
    "query_tokens": "uniform 20..60",
    "output_tokens_per_call": "uniform 20..48 (mean 34)",
    "tool_result_tokens": "uniform 20..50",
    "mean_prompt_tokens_per_call": "about 735",
}


def _bfcl_program(
    pid: int, tenant: str, arrival: float, rng: random.Random, keys: Keys
) -> ProgramSpec:
    n_calls = lognormal_int(rng, 10.75, 0.5, 1, 40)
    docs = rng.randint(230, 330)
    query = rng.randint(20, 60)
    turns: list[tuple[int, str | None, float, int]] = []
    for k in range(n_calls):
        out = rng.randint(20, 48)
        if k == n_calls - 1:
            turns.append((out, None, 0.0, 0))
            break
        name = "api_call" if rng.random() < 0.7 else "fs_op"
        result = rng.randint(20, 50)
        turns.append((out, name, BFCL_TOOLS[name].sample(rng), result))
    first = ((keys.fresh(), docs), (keys.fresh(), query))
    return chain_program(pid, tenant, "bfcl", arrival, first, turns, keys)


# -- multiagent ------------------------------------------------------------------------

MA_TOOLS = {
    "web_search": ToolKind("web_search", 1.0, _loguniform(0.4, 2.5), "log-uniform 0.4-2.5 s"),
    "run_code": ToolKind("run_code", 2.0, _loguniform(0.5, 6.0), "log-uniform 0.5-6 s"),
}
#: agent -> (system prompt key, tokens, tool it calls after its step or None)
MA_AGENTS: dict[str, tuple[int, int, str | None]] = {
    "planner": (11, 3000, None),
    "researcher": (12, 4500, "web_search"),
    "coder": (13, 6000, "run_code"),
    "reviewer": (14, 2500, None),
    "writer": (15, 2000, None),
}
#: the fixed step graph: (agent, dependencies)
MA_STEPS: list[tuple[str, tuple[int, ...]]] = [
    ("planner", ()),
    ("researcher", (0,)),
    ("coder", (0,)),
    ("reviewer", (1, 2)),
    ("coder", (3,)),
    ("researcher", (3,)),
    ("reviewer", (4, 5)),
    ("writer", (6,)),
]
MA_PARAMS: dict[str, Any] = {
    "agents": {a: {"system_tokens": n, "tool": t} for a, (_, n, t) in MA_AGENTS.items()},
    "steps": [f"{a}<-{list(d)}" for a, d in MA_STEPS],
    "task_tokens": "uniform 200..600",
    "output_tokens_per_step": "uniform 100..400",
}
#: per step: the steps that wait for it
MA_DEPENDENTS = [
    [j for j, (_, deps) in enumerate(MA_STEPS) if i in deps] for i in range(len(MA_STEPS))
]


def _remaining_cost() -> list[float]:
    """Each step's static critical path to the end: LLM steps at the analysis estimate,
    tools as declared (the same for every workflow: the step graph is fixed)."""
    remaining = [0.0] * len(MA_STEPS)
    for i in reversed(range(len(MA_STEPS))):
        tool = MA_AGENTS[MA_STEPS[i][0]][2]
        own = LLM_STEP_COST_S + (MA_TOOLS[tool].declared_s if tool else 0.0)
        remaining[i] = own + max((remaining[j] for j in MA_DEPENDENTS[i]), default=0.0)
    return remaining


MA_REMAINING_S = _remaining_cost()


def _multiagent_program(
    pid: int, tenant: str, arrival: float, rng: random.Random, keys: Keys
) -> ProgramSpec:
    task_key, task = keys.fresh(), rng.randint(200, 600)
    outs = [rng.randint(100, 400) for _ in MA_STEPS]
    out_keys = [keys.fresh() for _ in MA_STEPS]
    calls: list[CallSpec] = []
    for i, (agent, deps) in enumerate(MA_STEPS):
        sys_key, sys_tokens, tool = MA_AGENTS[agent]
        segs: list[Segment] = [(sys_key, sys_tokens), (task_key, task)]
        segs.extend((out_keys[d], outs[d]) for d in deps)
        calls.append(
            CallSpec(
                index=i,
                deps=deps,
                base=None,
                append=tuple(segs),
                prompt_tokens=sum(t for _, t in segs),
                output_tokens=outs[i],
                output_key=out_keys[i],
                tool=tool,
                tool_s=MA_TOOLS[tool].sample(rng) if tool else 0.0,
                remaining_cost_s=MA_REMAINING_S[i],
                is_last_step=not MA_DEPENDENTS[i],
                agent=agent,
            )
        )
    return ProgramSpec(pid, f"multiagent-{pid}", tenant, "multiagent", arrival, tuple(calls))


# -- assembling workloads --------------------------------------------------------------

_GENERATORS: dict[str, Callable[[int, str, float, random.Random, Keys], ProgramSpec]] = {
    "swe": _swe_program,
    "bfcl": _bfcl_program,
    "multiagent": _multiagent_program,
}
_TOOLS = {"swe": SWE_TOOLS, "bfcl": BFCL_TOOLS, "multiagent": MA_TOOLS}
_PARAMS: dict[str, dict[str, Any]] = {
    "swe": SWE_PARAMS,
    "bfcl": BFCL_PARAMS,
    "multiagent": MA_PARAMS,
}
_SHARED = {
    "swe": {SWE_SYSTEM_KEY: SWE_SYSTEM_TOKENS},
    "bfcl": {},
    "multiagent": {k: n for k, n, _ in MA_AGENTS.values()},
}
#: mixed: tenant -> (program kind, weight, share of the expected GPU work it demands)
MIXED_TENANTS: dict[str, tuple[str, float, float]] = {
    "coders": ("swe", 2.0, 0.4),
    "reviewers": ("swe", 1.0, 0.3),
    "teams": ("multiagent", 1.0, 0.3),
}
WORKLOADS = ("swe", "bfcl", "multiagent", "mixed")


def program_work(p: ProgramSpec) -> float:
    """A rough GPU measure of a program in prefill-token equivalents, used only to set the
    mixed workload's per-tenant rates: each new prompt token counts 1, each output token
    11 (its share of reading the weights in a batch of 16) plus 1 per 760 tokens of
    context it reads (an 8B model's KV against its prefill rate)."""
    total = 0.0
    for c in p.calls:
        new = sum(n for _, n in c.append)
        total += new + c.output_tokens * (11.0 + c.prompt_tokens / 760.0)
    return total


def make_workload(name: str, n_programs: int, seed: int = 0) -> Workload:
    """`n_programs` programs of workload `name`, arrivals at unit rate."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    if n_programs < 1:
        raise ValueError("n_programs must be >= 1")
    rng = random.Random(f"treadle-agents-{name}-{seed}")
    keys = Keys()
    if name != "mixed":
        t = 0.0
        programs = []
        for pid in range(n_programs):
            t += rng.expovariate(1.0)
            programs.append(_GENERATORS[name](pid, "default", t, rng, keys))
        return Workload(
            name,
            seed,
            {"programs": n_programs, **_PARAMS[name]},
            programs,
            dict(_TOOLS[name]),
            {"default": 1.0},
            dict(_SHARED[name]),
        )
    # mixed: generate each tenant's programs, then merge their streams by arrival
    sample_rng = random.Random(f"treadle-agents-mixed-work-{seed}")
    mean_work = {}
    for kind in ("swe", "bfcl", "multiagent"):
        probe = [_GENERATORS[kind](0, "x", 0.0, sample_rng, Keys()) for _ in range(200)]
        mean_work[kind] = sum(program_work(p) for p in probe) / len(probe)
    # program rate of each tenant so that it demands its share of the work, scaled so that
    # all tenants together arrive at unit rate
    raw = {t: share / mean_work[k] for t, (k, _, share) in MIXED_TENANTS.items()}
    norm = sum(raw.values())
    rates = {t: r / norm for t, r in raw.items()}
    streams: list[tuple[float, str, str]] = []
    for tenant, (kind, _, _) in MIXED_TENANTS.items():
        t_rng = random.Random(f"treadle-agents-mixed-{tenant}-{seed}")
        t = 0.0
        for _ in range(n_programs):
            t += t_rng.expovariate(rates[tenant])
            streams.append((t, tenant, kind))
    streams.sort()
    streams = streams[:n_programs]
    programs = []
    for pid, (t, tenant, kind) in enumerate(streams):
        programs.append(_GENERATORS[kind](pid, tenant, t, rng, keys))
    tools: dict[str, ToolKind] = {}
    shared: dict[int, int] = {}
    for kind in ("swe", "bfcl", "multiagent"):
        tools.update(_TOOLS[kind])
        shared.update(_SHARED[kind])
    counts = {t: sum(1 for p in programs if p.tenant == t) for t in MIXED_TENANTS}
    params = {
        "programs": n_programs,
        "tenants": {
            t: {
                "kind": k,
                "weight": w,
                "demand_share": d,
                "programs": counts[t],
                "rate_share": round(rates[t], 4),
            }
            for t, (k, w, d) in MIXED_TENANTS.items()
        },
    }
    return Workload(
        "mixed",
        seed,
        params,
        programs,
        tools,
        {t: w for t, (_, w, _) in MIXED_TENANTS.items()},
        shared,
    )
