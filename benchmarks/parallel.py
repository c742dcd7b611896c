"""`treadle bench parallel`: parallel function calling (docs/benchmarks.md).

Data sets: LLMCompiler's HotpotQA comparison (two searches), Movie recommendation (a search
per movie and per option, eight in all) and ParallelQA (`branch` searches, each followed by
a math step on its result), plus BFCL v4 `parallel` and `parallel_multiple` (real function
schemas and the calls a correct model makes, from `possible_answer/`).

Systems, all through treadle's real code path in the same process on the same inputs:
- `react`: an `llm` node that calls one tool per LLM turn (ReAct: a thought, an action);
- `native`: an `llm` node that asks for every independent call of a step in one turn
  (OpenAI-style parallel function calling; dependent calls take another turn);
- `plan`: a `planner` node whose model cannot stream: the whole plan, then execution;
- `stream`: the `planner` node streaming: each task starts as its line arrives (treadle).

What is real and what is simulated:
- Real: the runtime, the planner (incremental parsing, event-driven dispatch, argument
  substitution and validation, joiner, checkpoints in the memory store), the `llm` node's
  tool loop, events. BFCL tools are real `Tool`s built from the BFCL JSON schemas (leaf
  types strict, so a wrongly typed argument fails); every call's arguments are also checked
  against the raw schema (`jsonschema` when installed) and against the ground truth.
- Simulated: the model and the tools. The model's *text* is scripted per query — the plan,
  thoughts, calls and answers a correct model writes in each system's format — and its
  *timing* comes from the engine simulator's profile (`treadle.backends.sim.profile`,
  default LLaMA-3.1-70B on 4 x H100): time to first token = prefill time of the prompt
  tokens not in the prefix cache (vLLM-style, 16-token blocks, one cache per system), then
  one decode step per output token at the batch size of the moment. Search latency is a
  shifted exponential, 0.307 s + Exp(mean 0.303 s): mean 0.61 s and expected slowest of 8
  = 0.307 + 0.303 x H(8) = 1.13 s, the two numbers LLMCompiler measured; the draw is fixed
  per (query, call), so every system sees the same latencies. The math tool is an LLM call
  on the same simulated engine (LLMCompiler's math tool asks the LLM for an expression).
  BFCL mock tools take their time from the same model.
- Time: latencies are measured in virtual time: an asyncio loop whose clock jumps to the
  next timer when nothing is ready, so simulated waits cost nothing and latencies are
  exact and repeatable; the CPU work the runtime does takes no virtual time. That work is
  measured separately in real wall-clock time: dispatch overhead per task = (wall time of a
  run with the plan's tasks - the same run with an empty plan) / tasks, with a model and
  tools that answer at once (the fastest of several repetitions, i.e. the run least disturbed
  by other processes on the machine). It covers parsing, dispatch, argument
  substitution and validation, the tool call, events and the checkpoint of each task.

Anchors (LLMCompiler, Table 1, vs ReAct): HotpotQA 1.80x, Movie 3.74x, ParallelQA 2.15x;
streaming 1.30x on ParallelQA.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import math
import re
import selectors
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import typer
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    create_model,
)

from treadle.backends.base import (
    Capabilities,
    LLMRequest,
    LLMResponse,
    Message,
    StreamChunk,
    ToolCall,
    Usage,
)
from treadle.backends.sim.profile import Profile
from treadle.backends.sim.tokenizer import tokenize, tokenize_with_offsets
from treadle.benchmarks.common import data_dir, mean, percentile, print_table, write_report
from treadle.graphs.builder import Graph
from treadle.graphs.compile import CompiledGraph
from treadle.runtime.execution.runtime import Runtime
from treadle.tools import Tool

DATASETS = ("hotpotqa", "movie", "parallelqa", "bfcl")
SYSTEMS = ("react", "native", "plan", "stream")
DEFAULT_PROFILE = "h100_sxm_llama31_70b_tp4"
DEFAULT_LIMITS = {"hotpotqa": 150, "movie": 150, "parallelqa": 113, "bfcl": 400}
QUICK_LIMITS = {"hotpotqa": 20, "movie": 20, "parallelqa": 30, "bfcl": 40}
#: LLMCompiler's reported speedups over ReAct, and of streaming over plan-then-execute
TARGETS = {"hotpotqa": 1.8, "movie": 3.7, "parallelqa": 2.15}
STREAM_TARGET = 1.3
#: ratio -> (system, system): the first's mean latency over the second's
RATIOS = {
    "speedup_vs_react": ("react", "stream"),
    "plan_speedup_vs_react": ("react", "plan"),
    "native_speedup_vs_react": ("react", "native"),
    "stream_vs_plan": ("plan", "stream"),
}
OVERHEAD_TARGET_MS = 0.2

#: search latency: a fixed floor plus an exponential tail (see the module docstring)
SEARCH_FLOOR_S = 0.307
SEARCH_TAIL_MEAN_S = 0.303
#: prefix-cache block size (vLLM's default)
BLOCK = 16


# -- virtual time -------------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """Polls for real I/O without blocking; when nothing is ready and a timer is due next,
    moves the loop's virtual clock to it instead of sleeping."""

    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            # nothing is scheduled: only real I/O (a thread finishing) can wake the loop
            ready = super().select(10.0)
            if not ready:
                raise RuntimeError("virtual-time loop: nothing scheduled and nothing ready")
            return ready
        self.loop.virtual_now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time: `loop.time()` only moves when every task waits."""

    def __init__(self) -> None:
        self.virtual_now = 0.0
        selector = _JumpingSelector()
        selector.loop = self
        super().__init__(selector)

    def time(self) -> float:
        return self.virtual_now


# -- the simulated model ------------------------------------------------------------------

Script = Callable[[LLMRequest], tuple[str | None, list[ToolCall]]]


class SimLLM:
    """A scripted model with the simulated engine's timing (or none, when `instant`)."""

    def __init__(self, profile: Profile, script: Script, *, instant: bool = False) -> None:
        self.profile = profile
        self.script = script
        self.instant = instant
        self.decoding = 0
        self.calls = 0
        self._cached: set[int] = set()
        self._message_tokens: dict[tuple[str, str], tuple[int, ...]] = {}
        self._chunks: dict[str, list[StreamChunk]] = {}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=True, tool_calls=True, prefix_cache=True)

    # -- timing --------------------------------------------------------------------------

    def _prompt_tokens(self, request: LLMRequest) -> list[int]:
        out: list[int] = []
        if request.tools:
            out += self._tokens("tools", json.dumps(request.tools, sort_keys=True))
        for m in request.messages:
            text = m.content or ""
            if m.tool_calls:
                text += "".join(f"{c.name}{c.arguments}" for c in m.tool_calls)
            out += self._tokens(m.role, text)
        return out

    def _tokens(self, role: str, text: str) -> tuple[int, ...]:
        key = (role, text)
        cached = self._message_tokens.get(key)
        if cached is None:
            cached = (1, *tokenize(role), 2, *tokenize(text), 3)  # header, content, end
            self._message_tokens[key] = cached
        return cached

    def _prefill_s(self, tokens: list[int]) -> float:
        """Prefill time of what the prefix cache does not hold; the prompt is then cached."""
        parent = 0
        hit = 0
        missing = False
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            parent = hash((parent, *tokens[start : start + BLOCK]))
            if not missing and parent in self._cached:
                hit += BLOCK
            else:
                missing = True
                self._cached.add(parent)
        # the engine always computes at least the last prompt token
        return self.profile.prefill_time(len(tokens), min(hit, len(tokens) - 1))

    async def _decode(self, n: int, context: int) -> None:
        step = self.profile.decode_step_time(max(self.decoding, 1), context)
        await anyio.sleep(step * n)

    # -- the Backend protocol -------------------------------------------------------------

    def _answer(self, request: LLMRequest) -> tuple[str | None, list[ToolCall], int]:
        self.calls += 1
        content, calls = self.script(request)
        completion = len(tokenize(content or "")) + sum(
            len(tokenize(c.name + c.arguments)) + 1 for c in calls
        )
        return content, calls, completion + 1  # + end of turn

    async def generate(self, request: LLMRequest) -> LLMResponse:
        if self.instant:
            content, calls = self.script(request)
            return LLMResponse(content=content, tool_calls=calls)
        prompt = self._prompt_tokens(request)
        await anyio.sleep(self._prefill_s(prompt))
        content, calls, completion = self._answer(request)
        self.decoding += 1
        try:
            await self._decode(completion, len(prompt))
        finally:
            self.decoding -= 1
        return LLMResponse(
            content=content,
            tool_calls=calls,
            finish_reason="tool_calls" if calls else "stop",
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion),
        )

    async def stream(self, request: LLMRequest) -> Any:
        if self.instant:
            content, calls = self.script(request)
            for chunk in self._instant_chunks(content or ""):
                yield chunk
            yield StreamChunk(tool_calls=calls, finish_reason="stop")
            return
        prompt = self._prompt_tokens(request)
        await anyio.sleep(self._prefill_s(prompt))
        content, calls, completion = self._answer(request)
        text = content or ""
        _, ends = tokenize_with_offsets(text)
        self.decoding += 1
        try:
            start = 0
            for end in ends:
                await self._decode(1, len(prompt))
                yield StreamChunk(delta=text[start:end])
                start = end
            if start < len(text):
                yield StreamChunk(delta=text[start:])
            await self._decode(max(completion - len(ends), 1), len(prompt))
        finally:
            self.decoding -= 1
        yield StreamChunk(
            tool_calls=calls,
            finish_reason="stop",
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion),
        )

    def _instant_chunks(self, text: str) -> list[StreamChunk]:
        chunks = self._chunks.get(text)
        if chunks is None:
            _, ends = tokenize_with_offsets(text)
            starts = [0, *ends[:-1]]
            chunks = [StreamChunk(delta=text[a:b]) for a, b in zip(starts, ends, strict=True)]
            self._chunks[text] = chunks
        return chunks


class NoStream:
    """The same model without streaming: the planner gets the whole plan at once."""

    def __init__(self, inner: SimLLM) -> None:
        self.inner = inner

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=False, tool_calls=True, prefix_cache=True)

    async def generate(self, request: LLMRequest) -> LLMResponse:
        return await self.inner.generate(request)


# -- workloads ----------------------------------------------------------------------------


@dataclass
class Step:
    """One tool call of a query's solution."""

    tool: str
    #: the arguments as a plan writes them (references as `$N`), rendered in the plan line
    plan_args: str
    #: the arguments a step-by-step model writes (results already inline)
    args: dict[str, Any]
    deps: tuple[int, ...] = ()
    #: what a ReAct model thinks before the call
    thought: str = ""


@dataclass
class Workload:
    dataset: str
    qid: str
    question: str
    steps: list[Step]
    answer: str
    final_thought: str
    plan_thought: str = "I can answer the question now."
    #: BFCL: the functions offered, and the expected arguments per call
    functions: list[dict[str, Any]] = field(default_factory=list)
    expected: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def empty(self) -> Workload:
        """The same query answered without any tool (the overhead baseline)."""
        return replace(self, steps=[], expected=[])

    # -- what each system's model writes ---------------------------------------------------

    def plan_text(self) -> str:
        lines = [f"{i}. {s.tool}({s.plan_args})" for i, s in enumerate(self.steps, 1)]
        lines.append(f"Thought: {self.plan_thought}")
        lines.append(f"{len(self.steps) + 1}. join()<END_OF_PLAN>")
        return "\n".join(lines)

    def joiner_text(self) -> str:
        return f"Thought: {self.final_thought}\nAction: Finish({self.answer})"

    def final_text(self) -> str:
        return f"Thought: {self.final_thought}\nAnswer: {self.answer}"

    def levels(self) -> list[list[int]]:
        """Step indexes grouped by dependency depth (what one native turn can ask for)."""
        depth: list[int] = []
        for s in self.steps:
            depth.append(1 + max((depth[d - 1] for d in s.deps), default=-1))
        return [
            [i for i, d in enumerate(depth) if d == lv] for lv in range(max(depth, default=-1) + 1)
        ]


_STOP = set(
    (
        "were are is was which what who when where did do does if the considering how in "
        "assuming given between among a an of and both suppose imagine compare comparing "
        "find for with take after before then by from to "
    ).split()
)
_PHRASE = re.compile(r"[A-Z][\w'’.&-]*(?:\s+(?:of|the|de|la|von|van)?\s*[A-Z0-9][\w'’.&-]*)*")


def entities(question: str, n: int) -> list[str]:
    """Capitalized phrases of a question (what a planner would search for), padded to n."""
    found: list[str] = []
    for m in _PHRASE.finditer(question):
        words = m.group(0).split()
        while words and words[0].lower() in _STOP:
            words.pop(0)
        phrase = re.sub(r"['’]s$", "", " ".join(words)).strip(".,?'’")
        if phrase and phrase not in found and phrase.lower() not in _STOP:
            found.append(phrase)
    nouns = re.findall(r"\b[a-z]{5,}\b", question)
    while len(found) < n:
        found.append(f"{nouns[len(found) % len(nouns)] if nouns else 'item'} {len(found) + 1}")
    return found[:n]


def _quote(text: str) -> str:
    """A string literal for a plan line (a literal `$` is written `$$`)."""
    return json.dumps(text.replace("$", "$$"))


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def _words(seed: int, n: int) -> str:
    vocab = (
        "born served known released located founded american film director series city "
        "river century novel studio award record album team season region history town "
        "university company famous early career later largest popular national original"
    ).split()
    out = []
    for i in range(n):
        seed = _digest(seed, i)
        out.append(vocab[seed % len(vocab)])
    return " ".join(out)


def fact_value(entity: str) -> int:
    return 100 + _digest("value", entity) % 9000


@functools.lru_cache(maxsize=4096)
def search_text(entity: str) -> str:
    """A synthetic search result of the length of a Wikipedia lead (about 110 tokens)."""
    seed = _digest("search", entity)
    return (
        f"{entity}: {_words(seed, 40)}. The figure most often given is {fact_value(entity)}. "
        f"{_words(seed + 1, 40)}."
    )


def _item_workload(dataset: str, item: dict[str, Any], steps: list[Step], final: str) -> Workload:
    return Workload(dataset, str(item["id"]), item["question"], steps, str(item["answer"]), final)


def _searches(names: list[str], plan: str) -> list[Step]:
    """A search per name; a ReAct model states `plan` before the first, then goes on."""
    return [
        Step(
            "search",
            _quote(n),
            {"query": n},
            thought=f"{plan} First, {n}."
            if i == 0
            else f"I found {names[i - 1]}. Next I need to search {n}.",
        )
        for i, n in enumerate(names)
    ]


def hotpotqa(items: list[dict[str, Any]]) -> list[Workload]:
    out = []
    for item in items:
        a, b = entities(item["question"], 2)
        steps = [
            Step(
                "search",
                _quote(a),
                {"query": a},
                thought=f"I need to search {a} and {b}, find what the question asks "
                "about each, then compare them.",
            ),
            Step(
                "search",
                _quote(b),
                {"query": b},
                thought=f"I found {a}. I need to search {b} next and find the same fact.",
            ),
        ]
        final = f"I found the facts about both {a} and {b}, so I can compare them."
        out.append(_item_workload("hotpotqa", item, steps, final))
    return out


def movie(items: list[dict[str, Any]]) -> list[Workload]:
    out = []
    for item in items:
        head, _, options = item["question"].partition("Options:")
        movies = [m.strip() for m in head.split("similar to", 1)[-1].split(",") if m.strip()]
        names = movies + [o.strip() for o in options.splitlines() if o.strip()]
        steps = _searches(
            names,
            "I need to find the genre and era of each of the given movies and of each option, "
            "then pick the closest option.",
        )
        final = f"Comparing genres and eras, {item['answer']} is the most similar option."
        out.append(_item_workload("movie", item, steps, final))
    return out


def parallelqa(items: list[dict[str, Any]]) -> list[Workload]:
    out = []
    for item in items:
        width = int(item["branch"])
        names = entities(item["question"], width)
        pcts = re.findall(r"(\d+(?:\.\d+)?)\s*%", item["question"]) or ["10"]
        steps = _searches(
            names,
            f"I need the figure for each of the {width} items, change each as the question "
            "says, then compare.",
        )
        for i, n in enumerate(names):
            pct = pcts[i % len(pcts)]
            problem = f"What is {pct}% more than the figure for {n}?"
            steps.append(
                Step(
                    "math",
                    f'{_quote(problem)}, ["${i + 1}"]',
                    {"problem": problem.replace("the figure for " + n, str(fact_value(n)))},
                    deps=(i + 1,),
                    thought=f"Now I need to compute the changed figure for {n}.",
                )
            )
        final = f"Comparing the {width} computed figures, the answer is {item['answer']}."
        out.append(_item_workload("parallelqa", item, steps, final))
    return out


def bfcl(root: Path, limit: int) -> list[Workload]:
    out: list[Workload] = []
    for category in ("parallel", "parallel_multiple"):
        questions = [json.loads(x) for x in (root / f"BFCL_v4_{category}.json").open()]
        answers = {
            a["id"]: a["ground_truth"]
            for a in map(json.loads, (root / "possible_answer" / f"BFCL_v4_{category}.json").open())
        }
        for q in questions:
            text = " ".join(
                m["content"] for turn in q["question"] for m in turn if m["role"] == "user"
            )
            expected = []
            steps = []
            schemas = {f["name"]: f.get("parameters", {}) for f in q["function"]}
            for call in answers[q["id"]]:
                ((name, options),) = call.items()
                args = choose_args(options, schemas.get(name, {}))
                tname = tool_name(name)
                expected.append((tname, args))
                plan_args = ", ".join(f"{k}={_literal(v)}" for k, v in args.items())
                steps.append(Step(tname, plan_args, args))
            final = f"Every requested call has returned ({len(steps)} calls)."
            out.append(
                Workload(
                    "bfcl",
                    q["id"],
                    text,
                    steps,
                    f"Done: {len(steps)} calls.",
                    final,
                    "All calls are independent.",
                    q["function"],
                    expected,
                )
            )
    # both categories, interleaved, so that a limit takes some of each
    half = [w for w in out if not w.qid.startswith("parallel_multiple")]
    multi = [w for w in out if w.qid.startswith("parallel_multiple")]
    mixed = [w for pair in zip(half, multi, strict=False) for w in pair]
    return mixed[:limit]


_OMIT: Any = object()


def choose_args(options: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The call a correct model makes: for each parameter, the first of the ground truth's
    acceptable values ("" = may be left out) that its schema accepts. When no option is
    valid (a few BFCL answers contradict their own schema), the first one is kept, and the
    call is reported as invalid."""
    props = params.get("properties", {})
    required = set(params.get("required", []))
    out = {}
    for name, opts in options.items():
        value = _choose(opts, props.get(name), name in required)
        if value is not _OMIT:
            out[name] = value
    return out


def _choose(opts: Any, prop: dict[str, Any] | None, required: bool) -> Any:
    candidates = opts if isinstance(opts, list) and opts else [opts]
    fallback: Any = _OMIT
    for option in candidates:
        if option == "":
            if not required:
                return _OMIT
            continue
        value = choose_args(option, prop or {}) if isinstance(option, dict) and prop else option
        if fallback is _OMIT:
            fallback = value
        if prop is not None and value_error(prop, value) is None:
            return value
    return fallback


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def tool_name(name: str) -> str:
    """BFCL names may hold dots; tools (as in BFCL's OpenAI handler) use underscores."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)[:64]


def load(dataset: str, root: Path, limit: int) -> list[Workload]:
    files = {
        "hotpotqa": ("hotpotqa_comparison.json", hotpotqa),
        "movie": ("movie_recommendations_formatted.json", movie),
        "parallelqa": ("parallelqa_dataset.json", parallelqa),
    }
    if dataset == "bfcl":
        return bfcl(root / "bfcl", limit)
    name, build = files[dataset]
    items = json.loads((root / "llmcompiler" / name).read_text())
    return build(items[:limit])


# -- tools --------------------------------------------------------------------------------

MATH_PROMPT = (
    "Translate a math problem into an expression that can be executed with Python's "
    "numexpr library, using the context when it is given, and report the result. Use the "
    "format:\nQuestion: ${question}\n```text\n${expression}\n```\n...numexpr.evaluate(text)...\n"
    "```output\n${result}\n```\nAnswer: ${answer}\n" + "Example: " * 60
)


class World:
    """One data set's tools and the scripted model's answers for the query being run."""

    def __init__(self, profile: Profile, seed: int) -> None:
        self.profile = profile
        self.seed = seed
        self.instant = False
        self.workload: Workload | None = None
        #: the engine the math tool asks (set to the system's model: one engine serves all)
        self.math_llm: SimLLM | None = None
        #: BFCL: the arguments each mock tool received, per query
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._graphs: dict[tuple[str, str, int], CompiledGraph] = {}
        self._bfcl_tools: dict[str, list[Tool]] = {}

    def latency(self, *key: object) -> float:
        """The fixed simulated latency of one call: 0.307 s + Exp(0.303 s)."""
        u = (_digest(self.seed, *key) % 2**52 + 0.5) / 2**52
        return SEARCH_FLOOR_S - SEARCH_TAIL_MEAN_S * math.log(1 - u)

    @property
    def qid(self) -> str:
        assert self.workload is not None
        return self.workload.qid

    def search_tool(self) -> Tool:
        async def search(query: str) -> str:
            """Search Wikipedia for an entity and return the lead of its article.

            Args:
                query: The entity to look up.
            """
            if not self.instant:
                await anyio.sleep(self.latency(self.qid, "search", query))
            return search_text(query)

        return Tool(search, timeout_s=None)

    def math_tool(self) -> Tool:
        async def math(problem: str, context: list[str] | None = None) -> str:
            """Solve a math problem with the help of an LLM and numexpr.

            Args:
                problem: The problem, in words, with the numbers it needs.
                context: Earlier results the problem refers to.
            """
            text = problem + "\n" + "\n".join(context or [])
            if self.instant:
                return _math_answer(text)
            request = LLMRequest(
                model="math",
                messages=[
                    Message(role="system", content=MATH_PROMPT),
                    Message(role="user", content=f"Question: {text}"),
                ],
            )
            assert self.math_llm is not None
            response = await self.math_llm.generate(request)
            return _math_answer(response.content or "")

        return Tool(math, timeout_s=None)

    def math_script(self, request: LLMRequest) -> tuple[str | None, list[ToolCall]]:
        text = request.messages[-1].content or ""
        value = _math_answer(text)
        expr = f"{value} * 1"
        return (
            f'```text\n{expr}\n```\n...numexpr.evaluate("{expr}")...\n```output\n{value}\n```'
            f"\nAnswer: {value}",
            [],
        )

    def graph(self, system: str, w: Workload, tools: list[Tool] | None) -> CompiledGraph:
        """The compiled program for `system` (BFCL: with the query's own functions)."""
        key = (system, w.qid if tools is None else "", len(w.steps))
        cg = self._graphs.get(key)
        if cg is None:
            if tools is None:
                tools = self._bfcl_tools.get(w.qid)
                if tools is None:
                    tools = self._bfcl_tools[w.qid] = [self._bfcl_tool(f) for f in w.functions]
            cg = self._graphs[key] = build_graph(system, tools, max_turns=len(w.steps) + 2)
        return cg

    def _bfcl_tool(self, function: dict[str, Any]) -> Tool:
        """A `Tool` for a BFCL function: its arguments model is built from the JSON schema
        (strict leaf types; names such as `_from` kept through aliases), its body records
        the arguments it was given and takes the simulated latency."""
        name = tool_name(function["name"])
        params = function.get("parameters", {})
        required = set(params.get("required", []))
        fields: dict[str, Any] = {}
        sig_params = []
        names: dict[str, str] = {}  # Python name -> schema name
        for i, (pname, prop) in enumerate(params.get("properties", {}).items()):
            py = pname if pname.isidentifier() and not pname.startswith("_") else f"p{i}_"
            names[py] = pname
            tp = bfcl_type(prop, f"{name}_{pname}")
            if pname in required:
                fields[py] = (tp, Field(..., alias=pname, description=prop.get("description")))
            else:
                # None means "not given": BFCL's types never allow null, so a correct call
                # never passes it, and the body records only what the caller gave
                fields[py] = (
                    tp | None,
                    Field(None, alias=pname, description=prop.get("description")),
                )
            sig_params.append(
                inspect.Parameter(py, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any)
            )
        world = self

        async def call(**kwargs: Any) -> str:
            args = {names[k]: _jsonable(v) for k, v in kwargs.items() if v is not None}
            world.received.append((name, args))
            if not world.instant:
                await anyio.sleep(world.latency(world.qid, name, json.dumps(args, sort_keys=True)))
            return json.dumps({"ok": True, "function": name})

        call.__signature__ = inspect.Signature(sig_params)  # type: ignore[attr-defined]
        call.__name__ = name
        tool = Tool(call, name=name, description=function.get("description"), timeout_s=None)
        # the schema's own names (an alias per field) rather than the Python signature's
        tool.input_model = create_model(
            f"{name}_args", __config__=ConfigDict(extra="forbid", populate_by_name=False), **fields
        )
        return tool


def _math_answer(text: str) -> str:
    numbers = re.findall(r"\d+(?:\.\d+)?", text)
    base = float(numbers[-1]) if numbers else 1.0
    return f"{base * 1.1:.2f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {k: _jsonable(v) for k, v in value.model_dump(exclude_unset=True).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


_SCALARS: dict[str, Any] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
}


def bfcl_type(schema: dict[str, Any], name: str) -> Any:
    """The Python type of a BFCL parameter schema; leaf types are strict (no coercion)."""
    kind = schema.get("type", "any")
    if "enum" in schema:
        return Literal[tuple(schema["enum"])]
    if kind in _SCALARS:
        return Annotated[_SCALARS[kind], Strict()]
    if kind in ("array", "tuple"):
        items = schema.get("items")
        return list[bfcl_type(items, name + "_item")] if items else list[Any]  # type: ignore[misc]
    if kind == "dict":
        props = schema.get("properties")
        if not props:
            return dict[str, Any]
        required = set(schema.get("required", []))
        fields: dict[str, Any] = {}
        for k, v in props.items():
            tp = bfcl_type(v, f"{name}_{k}")
            fields[k] = (tp, ...) if k in required else (tp | None, Field(v.get("default")))
        return create_model(name, __config__=ConfigDict(extra="allow"), **fields)
    return Any


def json_schema(schema: Any) -> Any:
    """A BFCL schema as standard JSON Schema (dict -> object, float -> number, ...)."""
    if isinstance(schema, list):
        return [json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "type":
            mapped = {"dict": "object", "float": "number", "tuple": "array"}.get(v, v)
            if mapped == "any":
                continue
            out[k] = mapped
        elif k in ("optional", "format"):
            continue
        elif k == "properties":
            out[k] = {name: json_schema(s) for name, s in v.items()}
        else:
            out[k] = json_schema(v)
    return out


def schema_check(function: dict[str, Any], args: dict[str, Any]) -> str | None:
    """Validate a call's arguments against the function's raw schema; the error, or None."""
    return value_error(function.get("parameters", {}), args)


def value_error(schema: dict[str, Any], value: Any) -> str | None:
    """Why `value` does not match the BFCL `schema` (None when it does): checked with
    `jsonschema` when it is installed, else with the strict pydantic type of the schema."""
    try:
        import jsonschema
    except ImportError:
        try:
            TypeAdapter(bfcl_type(schema, "value")).validate_python(value)
        except ValidationError as exc:
            return str(exc.errors()[0]["msg"])
        return None
    try:
        jsonschema.validate(value, json_schema(schema))
    except jsonschema.ValidationError as exc:
        return str(exc.message)
    return None


# -- systems ------------------------------------------------------------------------------


def scripts(world: World, system: str) -> Script:
    """What the model answers in `system`, for the query `world` is running."""

    def planner(request: LLMRequest) -> tuple[str | None, list[ToolCall]]:
        w = world.workload
        assert w is not None
        rid = request.hints.request_id or ""
        if rid.endswith(":plan1"):
            return w.plan_text(), []
        if ":join" in rid:
            return w.joiner_text(), []
        raise RuntimeError(f"unexpected planner request {rid!r} (this benchmark never replans)")

    def stepwise(request: LLMRequest) -> tuple[str | None, list[ToolCall]]:
        w = world.workload
        assert w is not None
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if system == "react":
            if turn < len(w.steps):
                s = w.steps[turn]
                return (f"Thought: {s.thought}" if s.thought else None), [_call(w, turn)]
            return w.final_text(), []
        levels = w.levels()
        if turn < len(levels):
            return None, [_call(w, i) for i in levels[turn]]
        return w.final_text(), []

    answer = planner if system in ("plan", "stream") else stepwise

    def script(request: LLMRequest) -> tuple[str | None, list[ToolCall]]:
        if request.model == "math":
            return world.math_script(request)
        return answer(request)

    return script


def _call(w: Workload, i: int) -> ToolCall:
    s = w.steps[i]
    return ToolCall(id=f"call_{i}", name=s.tool, arguments=json.dumps(s.args))


def build_graph(system: str, tools: list[Tool], max_turns: int) -> CompiledGraph:
    g = Graph(f"parallel-{system}", inputs={"question": str})
    if system in ("plan", "stream"):
        node = g.planner("agent", "{question}", tools=tools, inputs={"question": g.input.question})
    else:
        node = g.llm(
            "agent",
            "{question}",
            system="Answer the question. Think step by step, then call a tool or answer.",
            tools=tools,
            max_turns=max_turns,
            inputs={"question": g.input.question},
        )
    g.output(answer=node.out)
    return Runtime().compile(g)


@dataclass
class Measured:
    latencies: list[float] = field(default_factory=list)
    llm_calls: int = 0
    tasks: int = 0
    calls_total: int = 0
    calls_valid: int = 0
    #: expected calls whose BFCL ground truth itself violates the function's schema
    ground_truth_invalid: int = 0
    invalid: list[str] = field(default_factory=list)
    overhead_ms_per_task: float = float("nan")


async def _run_one(
    world: World, system: str, w: Workload, backend: Any, tools: list[Tool] | None
) -> float:
    """Run one query; return its latency (in the loop's time)."""
    world.workload = w
    cg = world.graph(system, w, tools)
    runtime = Runtime(models={"default": backend})
    started = anyio.current_time()
    result = await runtime.run(cg, {"question": w.question}, check=False)
    elapsed = anyio.current_time() - started
    if not result.ok:
        raise RuntimeError(f"{w.dataset} {w.qid} on {system} failed: {result.error}")
    answer = str(result.output.answer)
    if w.answer not in answer:
        raise RuntimeError(f"{w.dataset} {w.qid} on {system}: wrong answer {answer[:80]!r}")
    return elapsed


def _backend(world: World, system: str, instant: bool) -> Any:
    sim = SimLLM(world.profile, scripts(world, system), instant=instant)
    world.math_llm = sim
    return NoStream(sim) if system == "plan" else sim


def _dataset_tools(world: World, dataset: str) -> list[Tool] | None:
    if dataset == "bfcl":
        return None  # each query brings its own functions
    tools = [world.search_tool()]
    if dataset == "parallelqa":
        tools.append(world.math_tool())
    return tools


async def measure_latency(
    world: World, dataset: str, system: str, workloads: list[Workload]
) -> Measured:
    out = Measured()
    backend = _backend(world, system, instant=False)
    tools = _dataset_tools(world, dataset)
    await _run_one(world, system, workloads[0], backend, tools)  # warm the prefix cache
    sim = backend.inner if isinstance(backend, NoStream) else backend
    sim.calls = 0
    for w in workloads:
        world.received = []
        out.latencies.append(await _run_one(world, system, w, backend, tools))
        out.tasks += len(w.steps)
        if dataset == "bfcl":
            _check_calls(w, world.received, out)
    out.llm_calls = sim.calls
    return out


def _check_calls(w: Workload, received: list[tuple[str, dict[str, Any]]], out: Measured) -> None:
    """Every expected call must have been made, with exactly the expected arguments, and
    those arguments must match the function's raw schema."""
    functions = {tool_name(f["name"]): f for f in w.functions}
    pending = list(received)
    for name, expected in w.expected:
        out.calls_total += 1
        match = next((r for r in pending if r[0] == name and r[1] == expected), None)
        problem = None
        if match is None:
            error = schema_check(functions[name], expected)
            if error is not None:
                out.ground_truth_invalid += 1
                problem = (
                    f"{w.qid}: BFCL's ground truth for {name} does not match its own schema "
                    f"({error}); the tool refused the call"
                )
            else:
                problem = f"{w.qid}: no call {name}({expected}) was made (got {pending})"
        else:
            pending.remove(match)
            error = schema_check(functions[name], match[1])
            if error is not None:
                problem = f"{w.qid}: {name} arguments do not match the schema: {error}"
        if problem is None:
            out.calls_valid += 1
        else:
            out.invalid.append(problem)


async def measure_overhead(
    world: World, dataset: str, system: str, workloads: list[Workload], reps: int
) -> float:
    """Real milliseconds of runtime work per task (see the module docstring)."""
    world.instant = True
    try:
        backend = _backend(world, system, instant=True)
        tools = _dataset_tools(world, dataset)
        full_s = empty_s = 0.0
        tasks = 0
        for w in workloads:
            variants = {"full": w, "empty": w.empty()}
            for v in variants.values():  # warm caches (chunks, tokens, compiled graphs)
                await _run_one(world, system, v, backend, tools)
            times: dict[str, list[float]] = {"full": [], "empty": []}
            for _ in range(reps):
                for key, v in variants.items():
                    started = time.perf_counter()
                    await _run_one(world, system, v, backend, tools)
                    times[key].append(time.perf_counter() - started)
            full_s += min(times["full"])
            empty_s += min(times["empty"])
            tasks += len(w.steps)
        return (full_s - empty_s) / max(tasks, 1) * 1000
    finally:
        world.instant = False


def run_dataset(
    dataset: str,
    workloads: list[Workload],
    profile: Profile,
    *,
    systems: Sequence[str],
    overhead_queries: int,
    reps: int,
    seed: int,
) -> dict[str, Measured]:
    world = World(profile, seed)
    results: dict[str, Measured] = {}
    for system in systems:

        async def latency(system: str = system) -> Measured:
            return await measure_latency(world, dataset, system, workloads)

        results[system] = anyio.run(latency, backend_options={"loop_factory": VirtualTimeLoop})

        async def overhead(system: str = system) -> float:
            subset = [w for w in workloads if w.steps][:overhead_queries]
            return await measure_overhead(world, dataset, system, subset, reps)

        results[system].overhead_ms_per_task = anyio.run(overhead)
    return results


# -- the command ---------------------------------------------------------------------------


def summarize(
    measured: dict[str, dict[str, Measured]],
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for dataset, systems in measured.items():
        results[dataset] = {}
        for system, m in systems.items():
            row: dict[str, Any] = {
                "latency_mean_s": mean(m.latencies),
                "latency_p50_s": percentile(m.latencies, 0.5),
                "latency_p95_s": percentile(m.latencies, 0.95),
                "queries": len(m.latencies),
                "tasks_per_query": m.tasks / max(len(m.latencies), 1),
                "llm_calls_per_query": m.llm_calls / max(len(m.latencies), 1),
                "dispatch_overhead_ms_per_task": m.overhead_ms_per_task,
            }
            if dataset == "bfcl":
                row["calls_valid"] = m.calls_valid
                row["calls_total"] = m.calls_total
                row["ground_truth_invalid"] = m.ground_truth_invalid
            results[dataset][system] = row
        lat = {s: r["latency_mean_s"] for s, r in results[dataset].items()}
        ratios[dataset] = {
            key: lat[slow] / lat[fast]
            for key, (slow, fast) in RATIOS.items()
            if slow in lat and fast in lat
        }
    return results, ratios


def _parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise typer.BadParameter(
            f"unknown {what} {', '.join(bad) or '(none)'}; one of: all, {', '.join(allowed)}"
        )
    return items


def main(
    dataset: Annotated[
        str, typer.Option("--dataset", help="all, or a comma list of: " + ", ".join(DATASETS))
    ] = "all",
    limit: Annotated[
        int | None, typer.Option("--limit", help="Queries per data set (default: per data set).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes, for smoke runs.")] = False,
    systems: Annotated[
        str, typer.Option("--systems", help="all, or a comma list of: " + ", ".join(SYSTEMS))
    ] = "all",
    profile: Annotated[
        str, typer.Option("--profile", help="Engine simulator profile for model timing.")
    ] = DEFAULT_PROFILE,
    reps: Annotated[int, typer.Option("--reps", help="Repetitions for the overhead.")] = 5,
    overhead_queries: Annotated[
        int, typer.Option("--overhead-queries", help="Queries per data set for the overhead.")
    ] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the tool latencies.")] = 0,
    data: Annotated[
        Path | None, typer.Option("--data", help="Data folder (default $TREADLE_DATA).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Parallel function calling: ReAct vs plan-then-execute vs treadle's streaming planner."""
    datasets = _parse_list(dataset, DATASETS, "data set")
    system_list = _parse_list(systems, SYSTEMS, "system")
    root = data or data_dir()
    if quick:
        reps, overhead_queries = min(reps, 3), min(overhead_queries, 4)
    prof = Profile.load(profile)
    wall = time.perf_counter()
    measured: dict[str, dict[str, Measured]] = {}
    config: dict[str, Any] = {
        "profile": prof.name,
        "systems": system_list,
        "decode_step_ms": prof.decode_step_time(1, 2000) * 1000,
        "search_latency": f"{SEARCH_FLOOR_S} s + Exp(mean {SEARCH_TAIL_MEAN_S} s)",
        "time": "virtual (latencies); real wall clock (overhead)",
        "overhead_reps": reps,
        "overhead_queries": overhead_queries,
        "seed": seed,
        "limits": {},
    }
    for name in datasets:
        n = limit if limit is not None else (QUICK_LIMITS if quick else DEFAULT_LIMITS)[name]
        workloads = load(name, root, n)
        config["limits"][name] = len(workloads)
        typer.echo(f"bench parallel: {name}: {len(workloads)} queries")
        measured[name] = run_dataset(
            name,
            workloads,
            prof,
            systems=system_list,
            overhead_queries=overhead_queries,
            reps=reps,
            seed=seed,
        )
    results, ratios = summarize(measured)
    config["wall_s"] = round(time.perf_counter() - wall, 1)
    _print(results, ratios, measured)
    write_report(json_path, "parallel", config, results, ratios)
    typer.echo(f"done in {config['wall_s']} s (profile {prof.name})")


def _print(
    results: dict[str, dict[str, dict[str, Any]]],
    ratios: dict[str, dict[str, float]],
    measured: dict[str, dict[str, Measured]],
) -> None:
    rows = []
    for dataset, systems in results.items():
        for system, r in systems.items():
            valid = ""
            if "calls_valid" in r:
                valid = f"{r['calls_valid']}/{r['calls_total']}"
                if r["ground_truth_invalid"]:
                    valid += "*"
            rows.append(
                [
                    dataset,
                    system,
                    r["latency_mean_s"],
                    r["latency_p95_s"],
                    r["llm_calls_per_query"],
                    r["tasks_per_query"],
                    r["dispatch_overhead_ms_per_task"],
                    valid,
                ]
            )
    print_table(
        "parallel function calling (latency in simulated seconds; overhead in real ms)",
        [
            "data set",
            "system",
            "latency mean s",
            "p95 s",
            "LLM calls",
            "tasks",
            "overhead ms/task",
            "BFCL calls valid",
        ],
        rows,
    )
    rrows = [[d, *(r.get(k, float("nan")) for k in RATIOS)] for d, r in ratios.items()]
    print_table(
        "ratios",
        ["data set", "stream vs react", "plan vs react", "native vs react", "stream vs plan"],
        rrows,
    )
    for dataset, r in ratios.items():
        target = TARGETS.get(dataset)
        if target is not None and "speedup_vs_react" in r:
            ok = "met" if r["speedup_vs_react"] >= target else "MISSED"
            typer.echo(
                f"{dataset}: speedup over react {r['speedup_vs_react']:.2f}x "
                f"(target {target}x) {ok}"
            )
    if "stream_vs_plan" in ratios.get("parallelqa", {}):
        v = ratios["parallelqa"]["stream_vs_plan"]
        typer.echo(
            f"parallelqa: stream vs plan {v:.2f}x (target {STREAM_TARGET}x) "
            f"{'met' if v >= STREAM_TARGET else 'MISSED'}"
        )
    problems: dict[str, list[str]] = {}
    for dataset, by_system in measured.items():
        for system, m in by_system.items():
            if m.overhead_ms_per_task >= OVERHEAD_TARGET_MS and system in ("plan", "stream"):
                typer.echo(
                    f"{dataset}/{system}: overhead {m.overhead_ms_per_task:.3f} ms/task "
                    f"over the {OVERHEAD_TARGET_MS} ms target"
                )
            for problem in m.invalid:
                problems.setdefault(problem, []).append(f"{dataset}/{system}")
    for problem, where in problems.items():
        typer.echo(f"INVALID ({', '.join(where)}): {problem}")
    if any(m.ground_truth_invalid for by in measured.values() for m in by.values()):
        typer.echo("* calls whose BFCL ground truth violates its own schema cannot validate")
