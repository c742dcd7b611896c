"""Agent-session traces in the GitHub Copilot coding-agent format: a reader that turns
sessions into programs for `treadle bench agents --trace PATH`, and a small seeded
generator of such traces.

The format is the public release's (Azure/AzurePublicDataset,
`analysis/GitHubCopilotCodingAgents/schema.json`): JSON lines (optionally gzip-compressed),
one session per line:

    {"session_id", "date", "turns": [{"turn_id",
        "llm_calls": [{"message_id", "timestamp", "duration_ms", "initiator_type", "model",
                       "result", "status_code", "tokens": {"total", "prompt", "completion",
                       "cached", "cached_pct"}, "message_metadata": [...]}],
        "tool_batches": [{"timestamp", "duration_ms", "auto_continue", "result",
                          "request_id", "function_calls": [{"name", "status",
                                                            "duration_ms"}]}]}]}

**Replaying a session** (`session_program`). Its LLM calls, turn after turn in time order,
form one conversation:

- a call whose prompt is at least the previous call's prompt plus completion continues
  that sequence with the difference as new content (tool results, a user message); a
  prompt that shrinks is a compaction: a fresh prompt of that size, all new content. The
  trace has no text, so no content is shared between sessions;
- between two calls of a turn the agent waits for the gap between the first call's end and
  the second's start (the tool batch whose `request_id` is the first call's `message_id`
  names the tool; its `duration_ms` is the gap when timestamps are missing);
- between the last call of a turn and the next turn's first call a *person* answers: that
  gap is a human wait (`CallSpec.human_wait_s`), which no system knows in advance;
- prompts longer than the simulated model's context are cut to `max_prompt_tokens`.

Sessions arrive as a Poisson process at the benchmark's rate (their own start times are
not replayed); a seed picks their order, and a trace with fewer sessions than a run needs
is replayed again with fresh content.

**The generator** (`generate_sessions`) draws sessions with the structure the release
describes, calibrated to its published aggregates (DATASET_CARD.md): 3.95 turns per
session (geometric), 7.83 LLM calls per turn, 1.12 tool calls per batch, a mean prompt of
about 68k tokens of which about 86 % is cached, and a mean completion of about 530 tokens.
What the release does not publish is an assumption stated here: tools and their durations
(a coding agent's mix: reading and searching files in well under a second, terminal
commands in seconds to minutes) and the person's think time between turns (lognormal,
median 45 s, clipped to 3 s .. 30 min).
"""

from __future__ import annotations

import gzip
import json
import math
import random
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from treadle.benchmarks.agents.workloads import (
    LLM_STEP_COST_S,
    CallSpec,
    Keys,
    ProgramSpec,
    ToolKind,
    Workload,
    clipped_lognormal,
    lognormal_int,
)

#: the longest prompt replayed (Llama-3.1's 128k context, less room for the answer)
MAX_PROMPT_TOKENS = 120_000

# -- reading -------------------------------------------------------------------------------


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from fh


def read_sessions(path: str | Path) -> list[dict[str, Any]]:
    """The sessions of a trace file (JSONL, `.gz` for gzip); a malformed line is an error
    naming the file, the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such trace file")
    sessions = []
    for lineno, line in enumerate(_open_text(p), 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}:{lineno}: not JSON: {exc.msg}") from None
        problem = _check_session(record)
        if problem:
            raise ValueError(f"{p}:{lineno}: {problem}")
        sessions.append(record)
    if not sessions:
        raise ValueError(f"{p}: no sessions")
    return sessions


def _check_session(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "a session must be a JSON object"
    turns = record.get("turns")
    if not isinstance(turns, list):
        return "field 'turns' must be a list"
    calls = 0
    for t, turn in enumerate(turns):
        llm_calls = turn.get("llm_calls") if isinstance(turn, dict) else None
        if not isinstance(llm_calls, list):
            return f"turns[{t}].llm_calls must be a list"
        for c, call in enumerate(llm_calls):
            tokens = call.get("tokens") if isinstance(call, dict) else None
            if not isinstance(tokens, dict):
                return f"turns[{t}].llm_calls[{c}].tokens must be an object"
            for key in ("prompt", "completion"):
                value = tokens.get(key)
                if not isinstance(value, int) or value < 0:
                    return f"turns[{t}].llm_calls[{c}].tokens.{key} must be an integer >= 0"
            calls += 1
        batches = turn.get("tool_batches", [])
        if not isinstance(batches, list):
            return f"turns[{t}].tool_batches must be a list"
    if not calls:
        return "a session needs at least one LLM call"
    return None


def _time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def session_program(
    session: dict[str, Any],
    pid: int,
    arrival: float,
    keys: Keys,
    *,
    tenant: str = "default",
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
) -> ProgramSpec:
    """One session as a program (module docstring)."""
    flat: list[tuple[int, dict[str, Any], dict[str, Any] | None]] = []
    for t, turn in enumerate(session["turns"]):
        batches = {
            b.get("request_id"): b for b in turn.get("tool_batches") or [] if isinstance(b, dict)
        }
        calls = sorted(turn["llm_calls"], key=lambda c: _time(c.get("timestamp")) or 0.0)
        for call in calls:
            flat.append((t, call, batches.get(call.get("message_id"))))
    specs: list[CallSpec] = []
    prev_seq = 0
    for i, (turn, call, batch) in enumerate(flat):
        tokens = call["tokens"]
        prompt = max(1, min(int(tokens["prompt"]), max_prompt_tokens))
        out = max(1, int(tokens["completion"]))
        if i and prompt >= prev_seq:
            base: int | None = i - 1
            new = prompt - prev_seq
            append: tuple[tuple[int, int], ...] = ((keys.fresh(), new),) if new else ()
        else:
            base, append = None, ((keys.fresh(), prompt),)
        nxt = flat[i + 1] if i + 1 < len(flat) else None
        gap = 0.0
        if nxt is not None:
            end = _time(call.get("timestamp"))
            start = _time(nxt[1].get("timestamp"))
            if end is not None and start is not None:
                gap = max(0.0, start - end - float(call.get("duration_ms") or 0.0) / 1000)
            elif batch is not None:
                gap = float(batch.get("duration_ms") or 0.0) / 1000
        human = nxt is not None and nxt[0] != turn
        tool = None
        if not human and nxt is not None:
            names = [f.get("name") for f in (batch or {}).get("function_calls") or []]
            tool = str(names[0]) if names and names[0] else "agent"
        specs.append(
            CallSpec(
                index=i,
                deps=(i - 1,) if i else (),
                base=base,
                append=append,
                prompt_tokens=prompt,
                output_tokens=out,
                output_key=keys.fresh(),
                tool=tool,
                tool_s=gap if tool else 0.0,
                remaining_cost_s=LLM_STEP_COST_S,
                is_last_step=False,
                continues=nxt is not None,
                human_wait_s=gap if human else 0.0,
            )
        )
        prev_seq = prompt + out
    name = str(session.get("session_id") or f"session-{pid}")
    return ProgramSpec(pid, name, tenant, "copilot", arrival, tuple(specs))


def trace_workload(path: str | Path, n_programs: int, seed: int = 0) -> Workload:
    """`n_programs` sessions of the trace at `path`, in a seeded order, arriving as a
    unit-rate Poisson process (sessions are replayed again when the trace has fewer)."""
    sessions = read_sessions(path)
    rng = random.Random(f"treadle-agents-trace-{seed}")
    order = list(range(len(sessions)))
    keys = Keys()
    programs = []
    t = 0.0
    for pid in range(n_programs):
        if pid % len(order) == 0:
            rng.shuffle(order)
        t += rng.expovariate(1.0)
        programs.append(session_program(sessions[order[pid % len(order)]], pid, t, keys))
    tools = {
        c.tool: ToolKind(c.tool, 0.5, lambda rng: 0.5, "replayed from the trace")
        for p in programs
        for c in p.calls
        if c.tool is not None
    }
    params = {"trace": str(path), "sessions_in_trace": len(sessions), "programs": n_programs}
    params.update(summarize(sessions))
    return Workload("trace", seed, params, programs, tools)


# -- the generator -------------------------------------------------------------------------

#: tool -> (share of function calls, median s, lognormal sigma, lo s, hi s)
COPILOT_TOOLS: dict[str, tuple[float, float, float, float, float]] = {
    "read_file": (0.30, 0.05, 0.6, 0.01, 2.0),
    "grep_search": (0.14, 0.3, 0.7, 0.05, 5.0),
    "replace_string_in_file": (0.16, 0.15, 0.6, 0.02, 3.0),
    "run_in_terminal": (0.20, 3.0, 1.3, 0.2, 300.0),
    "get_errors": (0.07, 1.0, 0.8, 0.1, 20.0),
    "semantic_search": (0.05, 1.5, 0.6, 0.2, 10.0),
    "create_file": (0.06, 0.05, 0.5, 0.01, 1.0),
    "file_search": (0.02, 0.2, 0.6, 0.02, 3.0),
}
#: the person's think time between turns (an assumption: the release publishes none)
HUMAN_WAIT = (45.0, 1.2, 3.0, 1800.0)


def _pick_tool(rng: random.Random) -> str:
    x = rng.random()
    for name, (share, *_) in COPILOT_TOOLS.items():
        x -= share
        if x <= 0:
            return name
    return "read_file"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def generate_sessions(n: int, seed: int = 0, *, start: str = "2026-06-01") -> list[dict[str, Any]]:
    """`n` sessions in the Copilot trace format (module docstring)."""
    rng = random.Random(f"treadle-copilot-{seed}")
    t0 = datetime.fromisoformat(start).replace(tzinfo=UTC).timestamp()
    sessions = []
    for s in range(n):
        clock = t0 + rng.uniform(0, 86_400.0)
        n_turns = 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / 3.95))
        context = int(clipped_lognormal(32_000, 0.35, 8_000, 60_000)(rng))
        system = min(context, 6_000)
        turns = []
        prev_seq = 0
        for t in range(n_turns):
            if t:
                clock += clipped_lognormal(*HUMAN_WAIT)(rng)
                context += int(clipped_lognormal(300, 0.8, 20, 4_000)(rng))  # the user
            calls: list[dict[str, Any]] = []
            batches: list[dict[str, Any]] = []
            n_calls = lognormal_int(rng, 7.83, 0.85, 1, 80)
            for c in range(n_calls):
                completion = lognormal_int(rng, 530, 0.9, 5, 8_000)
                if context + completion > MAX_PROMPT_TOKENS:
                    context = int(context * rng.uniform(0.3, 0.5))  # compaction
                    prev_seq = 0
                if prev_seq and rng.random() < (0.95 if c else 0.3):
                    cached = prev_seq  # the conversation so far
                else:
                    cached = min(system, context) if s else 0  # only the system prompt
                mid = f"m{seed}-{s}-{t}-{c}"
                duration = (context - cached) / 12_000 + completion * 0.018 + 0.3
                calls.append(
                    {
                        "message_id": mid,
                        "timestamp": _iso(clock),
                        "duration_ms": round(duration * 1000, 1),
                        "initiator_type": "agent" if c else "user",
                        "model": "Model A",
                        "result": "Success",
                        "status_code": "OK",
                        "tokens": {
                            "total": context + completion,
                            "prompt": context,
                            "completion": completion,
                            "cached": cached,
                            "cached_pct": round(100.0 * cached / context, 2),
                        },
                        "message_metadata": [
                            {
                                "type": "System",
                                "role": "system",
                                "sequenceId": 0,
                                "token_len": system,
                            },
                            {
                                "type": "Context",
                                "role": "user",
                                "sequenceId": 1,
                                "token_len": context - system,
                            },
                        ],
                    }
                )
                clock += duration
                prev_seq = context + completion
                context = prev_seq
                if c == n_calls - 1:
                    break
                width = 1 + (rng.random() < 0.108) + (rng.random() < 0.012)
                fcs = []
                longest = 0.0
                for _ in range(width):
                    name = _pick_tool(rng)
                    _, median, sigma, lo, hi = COPILOT_TOOLS[name]
                    d = clipped_lognormal(median, sigma, lo, hi)(rng)
                    longest = max(longest, d)
                    fcs.append({"name": name, "status": 1, "duration_ms": round(d * 1000, 1)})
                    context += int(clipped_lognormal(900, 1.0, 20, 12_000)(rng))
                wall = longest + 0.05
                batches.append(
                    {
                        "timestamp": _iso(clock),
                        "duration_ms": round(wall * 1000, 1),
                        "auto_continue": True,
                        "result": "Success",
                        "request_id": mid,
                        "function_calls": fcs,
                    }
                )
                clock += wall
            turns.append(
                {"turn_id": f"t{seed}-{s}-{t}", "llm_calls": calls, "tool_batches": batches}
            )
        date = datetime.fromtimestamp(t0, UTC).date().isoformat()
        sessions.append({"session_id": f"s{seed}-{s}", "date": date, "turns": turns})
    return sessions


def write_sessions(path: str | Path, sessions: Iterable[dict[str, Any]]) -> int:
    """Write sessions as JSON lines (gzip when the name ends in `.gz`); returns how many."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if p.suffix == ".gz" else open
    n = 0
    with opener(p, "wt", encoding="utf-8") as fh:
        for s in sessions:
            fh.write(json.dumps(s, separators=(",", ":")) + "\n")
            n += 1
    return n


def summarize(sessions: list[dict[str, Any]]) -> dict[str, float]:
    """The release's headline aggregates, computed over `sessions`."""
    turns = [t for s in sessions for t in s["turns"]]
    calls = [c for t in turns for c in t["llm_calls"]]
    batches = [b for t in turns for b in t.get("tool_batches") or [] if b.get("function_calls")]
    prompt = sum(c["tokens"]["prompt"] for c in calls)
    return {
        "turns_per_session": len(turns) / len(sessions),
        "llm_calls_per_turn": len(calls) / max(1, len(turns)),
        "tool_calls_per_batch": sum(len(b["function_calls"]) for b in batches)
        / max(1, len(batches)),
        "mean_prompt_tokens": prompt / max(1, len(calls)),
        "cached_fraction": sum(c["tokens"].get("cached", 0) for c in calls) / max(1, prompt),
        "mean_completion_tokens": sum(c["tokens"]["completion"] for c in calls)
        / max(1, len(calls)),
    }
