"""`treadle bench agents --engine llamacpp`: agents with tool waits on a real `llama-server`,
without help, with slot pinning, with KV offload, each beside the simulator's prediction.

A few programs run at once on one server with fewer slots than programs. Each program has
its own long system prompt and task, then `turns` rounds of: an LLM call offering tools
(the test model is nudged to call one: `tool_call_bias`), the tool's wait (a short `search`
or a long `run_tests`, seeded draws from exponentials), the tool's result appended; and a
last call without tools. While a program's tool runs, the others take the slots, so the
program's KV survives only if something keeps it:

- `none`: llama.cpp picks slots itself (longest common prefix, then least recently used),
  its host-RAM prompt cache off: the slot is the only KV tier, as on a GPU server;
- `pin`: `LlamaCppBackend` places requests and reserves a program's slot for the TTL that
  treadle's `PinPolicy` picks from the tool's duration estimate (the runtime's policy,
  fed with every tool's measured duration);
- `offload`: no pins; a waiting program's slot is saved to disk when another request
  needs it and restored when the program comes back;
- `pin+offload`: both (pins for short waits, offload when pins run out);
- `none+ram-cache`: llama.cpp's own second tier (`--cache-ram`), for reference.

Reported per mode (medians over `--reps`): `recomputed_tokens` (context a program had
computed before and that was computed again: each turn's previous prompt plus answer, less
what the server served from cache), `prefill_tokens` (all prompt tokens computed),
`turn_ttft_p50_s`, `makespan_s`, and the slot table's counters (pins set/refused, saves and
restores with their milliseconds). `offload_vs_recompute` sets the measured save+restore
time against the prefill time of the tokens restored. `predicted` is the simulator's run of
the same programs (same tool waits, same pin TTLs) with the calibrated profile; it has no
offload tier, so offload modes have no prediction.
"""

from __future__ import annotations

import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from treadle.backends.base import LLMRequest, LLMResponse, Message, SchedulingHints
from treadle.backends.openai_compat.llamacpp import LlamaCppBackend
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, EngineConfig, SimRequest
from treadle.backends.sim.profile import Profile
from treadle.runtime.sched.pinning import PinPolicy, PinRequest, ToolDurations
from treadle.testing.llamacpp import MODEL_ALIAS, LlamaServers
from treadle.testing.tiny_gguf import SMALL, write_tiny_gguf

MODES = ("none", "pin", "offload", "pin+offload", "none+ram-cache")
DEFAULT_PROFILE = "llamacpp_cpu_small"
TOOLS_MEAN_S = {"search": 0.4, "run_tests": 3.0}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool.",
            "parameters": {
                "type": "object",
                "properties": {"arg": {"type": "string"}},
                "required": ["arg"],
            },
        },
    }
    for name in TOOLS_MEAN_S
]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Setup:
    programs: int = 6
    turns: int = 3
    slots: int = 2
    slot_context: int = 4096
    system_words: int = 400
    result_words: int = 40
    reps: int = 3
    seed: int = 0


@dataclass
class Turn:
    program: int
    index: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    pin_ttl_s: float | None
    tool: str | None
    wait_s: float
    start_s: float


@dataclass
class ModeRun:
    turns: list[Turn] = field(default_factory=list)
    makespan_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 7))) for _ in range(n)
    )


def plan_waits(setup: Setup) -> list[list[tuple[str, float]]]:
    """Each program's tool and wait per turn (seeded, the same for every mode)."""
    rng = random.Random(setup.seed)
    plan = []
    for p in range(setup.programs):
        turns = []
        for t in range(setup.turns):
            tool = "run_tests" if (p + t) % 2 else "search"
            turns.append((tool, rng.expovariate(1.0 / TOOLS_MEAN_S[tool])))
        plan.append(turns)
    return plan


async def run_mode(
    url: str, mode: str, setup: Setup, waits: list[list[tuple[str, float]]]
) -> ModeRun:
    managed = mode not in ("none", "none+ram-cache")
    options: dict[str, Any] = {
        "tool_call_bias": 10.0,
        "manage_slots": managed,
        "pinning": "pin" in mode,
        "offload": "offload" in mode,
    }
    durations = ToolDurations()
    for name, mean in TOOLS_MEAN_S.items():
        durations.declare(name, mean)
    policy = PinPolicy(durations)
    capacity = setup.slots * setup.slot_context
    run = ModeRun()
    begin = time.perf_counter()
    llama = LlamaCppBackend(url, MODEL_ALIAS, dialect_options=options, timeout_s=600)
    async with llama:

        async def program(p: int) -> None:
            rng = random.Random(setup.seed * 1000 + p)
            program_id = f"prog-{p}"
            messages = [
                Message(role="system", content=f"agent {p}: " + _words(rng, setup.system_words)),
                Message(role="user", content=_words(rng, 40)),
            ]
            for t, (tool, wait) in enumerate(waits[p]):
                ttl: float | None = None
                if "pin" in mode:
                    estimate = sum(len(m.content or "") for m in messages) // 2 + 60
                    load = llama.table.in_use(llama.clock()) / setup.slots if llama.table else 0
                    decision = policy.decide(
                        PinRequest(
                            tokens=estimate,
                            prefill_s=estimate * 4e-4,
                            capacity_tokens=capacity,
                            pressure=load,
                            tool=tool,
                        )
                    )
                    ttl = decision.ttl_s if decision.pin else None
                hints = SchedulingHints(program_id=program_id, next_tool=tool, pin_ttl_s=ttl)
                request = LLMRequest(
                    model="agent",
                    messages=list(messages),
                    tools=TOOLS,
                    max_tokens=200,
                    temperature=0.0,
                    stream=True,
                    hints=hints,
                )
                start = time.perf_counter() - begin
                answer = await llama.generate(request)
                run.turns.append(_turn(p, t, answer, ttl, tool, wait, start))
                await anyio.sleep(wait)
                durations.observe(tool, wait)
                messages.append(
                    Message(role="assistant", content=answer.content, tool_calls=answer.tool_calls)
                )
                for call in answer.tool_calls:
                    messages.append(
                        Message(
                            role="tool",
                            tool_call_id=call.id,
                            content=_words(rng, setup.result_words),
                        )
                    )
            # the last call offers the same tools (the same prompt prefix); nothing follows it
            last = LLMRequest(
                model="agent",
                messages=messages,
                tools=TOOLS,
                max_tokens=200,
                temperature=0.0,
                stream=True,
                hints=SchedulingHints(program_id=program_id, is_last_step=True),
            )
            start = time.perf_counter() - begin
            answer = await llama.generate(last)
            run.turns.append(_turn(p, setup.turns, answer, None, None, 0.0, start))
            await llama.release_pins(program_id)

        async with anyio.create_task_group() as tg:
            for p in range(setup.programs):
                tg.start_soon(program, p)
        run.stats = llama.stats.as_dict()
    run.makespan_s = time.perf_counter() - begin
    return run


def _turn(
    p: int,
    t: int,
    answer: LLMResponse,
    ttl: float | None,
    tool: str | None,
    wait: float,
    start: float,
) -> Turn:
    u = answer.usage
    return Turn(
        p,
        t,
        u.prompt_tokens,
        u.cached_prompt_tokens,
        u.completion_tokens,
        answer.ttft_s or 0.0,
        ttl,
        tool,
        wait,
        start,
    )


def recomputed(turns: Sequence[Turn]) -> int:
    """Context computed before and computed again: for each turn after a program's first,
    its previous turn's prompt and answer less what the server served from cache."""
    by_program: dict[int, list[Turn]] = {}
    for t in turns:
        by_program.setdefault(t.program, []).append(t)
    total = 0
    for seq in by_program.values():
        seq.sort(key=lambda t: t.index)
        for prev, cur in itertools.pairwise(seq):
            known = min(prev.prompt_tokens + prev.completion_tokens, cur.prompt_tokens)
            total += max(0, known - cur.cached_tokens)
    return total


def summarize(run: ModeRun) -> dict[str, float]:
    turns = run.turns
    return {
        "recomputed_tokens": recomputed(turns),
        "prefill_tokens": sum(t.prompt_tokens - t.cached_tokens for t in turns),
        "prompt_tokens": sum(t.prompt_tokens for t in turns),
        "turn_ttft_p50_s": statistics.median(t.ttft_s for t in turns),
        "makespan_s": run.makespan_s,
        **{k: v for k, v in run.stats.items() if v},
    }


def simulate(profile: Profile, setup: Setup, reference: ModeRun, *, pins: bool) -> dict[str, float]:
    """The same programs on the simulated engine: each turn's prompt and answer tokens as
    the real run measured them, the same tool waits, and (with `pins`) the same TTLs."""
    overhead = profile.calibration.request_overhead_s if profile.calibration else 0.0
    clock = VirtualClock()
    config = EngineConfig(
        max_num_seqs=setup.slots,
        kv_capacity_blocks=setup.slots * setup.slot_context // profile.engine.block_size,
    )
    engine = Engine(profile, clock, config, name="sim")
    by_program: dict[int, list[Turn]] = {}
    for t in reference.turns:
        by_program.setdefault(t.program, []).append(t)
    finished: list[SimRequest] = []
    prompts: list[Turn] = []

    def start(p: int, i: int, prompt: Prompt | None) -> None:
        seq = sorted(by_program[p], key=lambda t: t.index)
        turn = seq[i]
        if prompt is None:
            prompt = Prompt.from_segments([((p, "turn", i), turn.prompt_tokens)])
        else:
            grow = max(1, turn.prompt_tokens - prompt.num_tokens)
            prompt = prompt.extend_segments([((p, "turn", i), grow)])
        ttl = turn.pin_ttl_s if pins else None

        def done(req: SimRequest) -> None:
            finished.append(req)
            prompts.append(turn)
            if i + 1 < len(seq):
                answered = prompt.extend_segments([((p, "answer", i), turn.completion_tokens)])
                clock.call_later(turn.wait_s + overhead, lambda: start(p, i + 1, answered))

        req = SimRequest(
            prompt,
            max(1, turn.completion_tokens),
            output_key=(p, "answer", i),
            program_id=f"prog-{p}",
            pin_ttl_s=ttl,
            is_last_step=i == len(seq) - 1,
            on_finish=done,
        )
        engine.submit(req)

    for p in by_program:
        clock.schedule(overhead, lambda p=p: start(p, 0, None))  # type: ignore[misc]
    clock.run()
    turns = [
        Turn(
            t.program,
            t.index,
            r.prompt_tokens,
            r.cached_tokens or 0,
            r.output_tokens,
            (r.ttft or 0.0) + overhead,
            None,
            t.tool,
            t.wait_s,
            0.0,
        )
        for r, t in zip(finished, prompts, strict=True)
    ]
    last = max((r.finish_time or 0.0) for r in finished)
    return {
        "recomputed_tokens": recomputed(turns),
        "prefill_tokens": sum(t.prompt_tokens - t.cached_tokens for t in turns),
        "turn_ttft_p50_s": statistics.median(t.ttft_s for t in turns),
        "makespan_s": last,
    }


def run_agents_llamacpp(
    *, setup: Setup, profile_name: str, echo: Callable[..., Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    waits = plan_waits(setup)
    profile = Profile.load(profile_name)
    runs: dict[str, list[ModeRun]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="treadle-bench-agents-") as tmp:
        model = write_tiny_gguf(Path(tmp) / "small.gguf", SMALL)
        for rep in range(setup.reps):
            for mode in MODES:
                ram = 256 if mode == "none+ram-cache" else 0
                with LlamaServers.start(
                    1,
                    model,
                    Path(tmp) / f"r{rep}-{mode.replace('+', '_')}",
                    slots=setup.slots,
                    context=setup.slots * setup.slot_context,
                    cache_ram_mib=ram,
                ) as servers:
                    run = anyio.run(run_mode, servers[0].url, mode, setup, waits)
                runs[mode].append(run)
                s = summarize(run)
                echo(
                    f"rep {rep + 1}/{setup.reps} {mode:15s} recomputed "
                    f"{s['recomputed_tokens']:6.0f}  makespan {s['makespan_s']:.1f} s"
                )
    results: dict[str, Any] = {}
    for mode in MODES:
        summaries = [summarize(r) for r in runs[mode]]
        keys = set().union(*summaries)
        results[mode] = {
            k: statistics.median(s.get(k, 0.0) for s in summaries) for k in sorted(keys)
        }
        reference = runs[mode][len(runs[mode]) // 2]
        if "offload" in mode or mode == "none+ram-cache":
            results[mode]["predicted"] = None
        else:
            results[mode]["predicted"] = simulate(profile, setup, reference, pins=mode == "pin")
    ratios = _ratios(results, profile)
    config = {
        "engine": "llamacpp",
        "model": f"treadle tiny {SMALL.layers}x{SMALL.hidden} (random weights)",
        **setup.__dict__,
        "tools_mean_s": TOOLS_MEAN_S,
        "profile": profile.name,
    }
    return config, results, ratios


def _ratios(results: dict[str, Any], profile: Profile) -> dict[str, Any]:
    none = results["none"]["recomputed_tokens"]
    ratios: dict[str, Any] = {}
    for mode in ("pin", "offload", "pin+offload"):
        r = results[mode]["recomputed_tokens"]
        ratios[f"{mode}_recomputed_vs_none"] = r / none if none else None
    off = results["offload"]
    restored = off.get("restored_tokens", 0.0)
    if restored:
        # what the restored tokens would have cost to prefill again, at the calibrated rate
        per_token = profile.prefill_time(2048) / 2048
        ratios["offload_vs_recompute"] = {
            "save_plus_restore_ms": off.get("save_ms", 0.0) + off.get("restore_ms", 0.0),
            "recompute_ms_estimate": restored * per_token * 1e3,
        }
    return ratios


def run_cli(engine: str, *, quick: bool, json_path: Path | None, seed: int, profile: str) -> None:
    """`treadle bench agents --engine llamacpp [--quick]`: run, print, write the report."""
    from rich.console import Console

    from treadle.benchmarks.common import print_table, write_report

    if engine != "llamacpp":
        raise ValueError(f"--engine must be sim or llamacpp, not {engine!r}")
    console = Console()
    setup = Setup(reps=1, seed=seed) if quick else Setup(reps=3, seed=seed)
    name = (
        profile if profile.startswith("llamacpp") or profile.endswith(".json") else DEFAULT_PROFILE
    )
    started = time.perf_counter()
    config, results, ratios = run_agents_llamacpp(
        setup=setup, profile_name=name, echo=console.print
    )
    config["wall_s"] = round(time.perf_counter() - started, 1)
    rows = []
    for mode, r in results.items():
        p = r["predicted"] or {}
        rows.append(
            [
                mode,
                r["recomputed_tokens"],
                p.get("recomputed_tokens", "-"),
                r["prefill_tokens"],
                p.get("prefill_tokens", "-"),
                r["turn_ttft_p50_s"],
                p.get("turn_ttft_p50_s", "-"),
                r["makespan_s"],
                p.get("makespan_s", "-"),
                f"{r.get('pins_set', 0):.0f}/{r.get('pins_refused', 0):.0f}",
                f"{r.get('saves', 0):.0f}/{r.get('restores', 0):.0f}",
            ]
        )
    print_table(
        f"agents with tool waits on a llama-server ({setup.programs} programs, {setup.slots} "
        f"slots, medians of {setup.reps}), beside the simulator ({config['profile']})",
        [
            "mode",
            "recomputed",
            "sim",
            "prefill tok",
            "sim",
            "TTFT p50 s",
            "sim",
            "makespan s",
            "sim",
            "pins set/refused",
            "saves/restores",
        ],
        rows,
        console=console,
    )
    for key, value in ratios.items():
        console.print(f"{key}: {value}")
    write_report(json_path, "agents-llamacpp", config, results, ratios)
