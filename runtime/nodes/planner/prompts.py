"""What the planner and the joiner of a `planner` node are told, and how the joiner's
answer is read.

The wording follows LLMCompiler's prompts (planner: one action a line, `$ID` references,
`join()` last, `<END_OF_PLAN>`; joiner: `Thought:` then `Action: Finish(...)` or
`Action: Replan(...)`), so models prompted for LLMCompiler work unchanged.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from treadle.tools import Tool

#: longest observation text shown to the joiner (a whole file can be a result)
MAX_OBSERVATION_CHARS = 4000

PLANNER_INSTRUCTIONS = """\
Given a user query, create a plan to solve it with the utmost parallelizability. \
Each plan should comprise an action from the following {count} types:
{actions}
{join_number}. join(): Collects and combines results from prior actions.
 - An LLM agent is called upon invoking join() to either finalize the user query or wait \
until the plans are executed.
 - join should always be the last action in the plan, and will be called in two scenarios:
   (a) if the answer can be determined by gathering the outputs from tasks to generate the \
final response.
   (b) if the answer cannot be determined in the planning phase before you execute the plans.

Guidelines:
 - Each action described above contains input/output types and description. You must \
strictly adhere to the input and output types for each action.
 - Write one action per line as `ID. action(arguments)`; arguments are Python literals, \
given by position or by name.
 - Each action MUST have a unique ID, which is strictly increasing.
 - Inputs for actions can either be constants or outputs from preceding actions. In the \
latter case, use the format $ID to denote the ID of the previous action whose output will \
be the input (${{ID.field}} for a field of it). Inside a string, $ID stands for the \
output's text; write $$ for a literal dollar sign.
 - Always call join as the last action in the plan. Say '<END_OF_PLAN>' after you call join.
 - Ensure the plan maximizes parallelizability.
 - Only use the provided action types. If a query cannot be addressed using these, invoke \
the join action for the next steps.
 - Never introduce new actions other than the ones provided.
 - You may write a line 'Thought: ...' before an action to reason about it."""

REPLAN_MESSAGE = """\
Results of that plan:
{scratchpad}

The plan must change: {reason}
Write a new plan for what is still missing. Number its actions from {next_id}; the results \
above can be used as $ID. End with join()."""

DEFAULT_JOINER = """\
Solve a question answering task. Here are some guidelines:
 - You will be given the results of a plan you have executed to answer the user's question.
 - Thought needs to reason about the question based on the Observations in 1-2 sentences.
 - Ignore irrelevant action results.
 - If the required information is present, give a concise but complete and helpful answer \
to the user's question.
 - If you are unable to give a satisfactory finishing answer, replan to get the required \
information."""

JOINER_FORMAT = """\
Respond in the following format:

Thought: <reason about the task results and whether you have sufficient information to \
answer the question>
Action: <action to take>

Available actions:
 (1) Finish(the final answer to return to the user): returns the answer and finishes the task.
 (2) Replan(the reasoning and other information that will help you plan again. Can be a \
line of any length): instructs why we must replan."""


@functools.lru_cache(maxsize=256)
def planner_system(tools: tuple[Tool, ...], system: str | None) -> str:
    """The planner's system prompt: the action list and format rules, then the node's own."""
    actions = "\n".join(f"{i}. {describe_tool(t)}" for i, t in enumerate(tools, 1))
    text = PLANNER_INSTRUCTIONS.format(
        count=len(tools) + 1, actions=actions, join_number=len(tools) + 1
    )
    return f"{text}\n\n{system}" if system else text


def describe_tool(tool: Tool) -> str:
    """`name(a: str, b: int = 3) -> float: description`, from the tool's JSON Schema."""
    schema = tool.parameters_schema
    required = set(schema.get("required", []))
    params = []
    notes = []
    for name, prop in schema.get("properties", {}).items():
        text = f"{name}: {_type_name(prop, schema.get('$defs', {}))}"
        if name not in required:
            text += f" = {json.dumps(prop.get('default'))}"
        params.append(text)
        if prop.get("description"):
            notes.append(f"   - {name}: {prop['description']}")
    returns = getattr(tool.output_type, "__name__", None) or str(tool.output_type)
    head = f"{tool.name}({', '.join(params)}) -> {returns}: {tool.description}"
    return "\n".join([head, *notes])


def _type_name(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type_name(s, defs) for s in schema[key])
    kind = schema.get("type")
    names = {
        "string": "str",
        "integer": "int",
        "number": "float",
        "boolean": "bool",
        "null": "None",
        "object": "dict",
    }
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}), defs)}]"
    if isinstance(kind, str):
        return names.get(kind, kind)
    return "Any"


# -- the scratchpad ---------------------------------------------------------------------


@dataclass
class ScratchEntry:
    """One line of an executed plan, as the joiner sees it."""

    kind: Literal["thought", "task", "problem"]
    text: str
    observation: str | None = None


def scratchpad(entries: Iterable[ScratchEntry]) -> str:
    out: list[str] = []
    for e in entries:
        if e.kind == "thought":
            out.append(f"Thought: {e.text}")
        elif e.kind == "problem":
            out.append(f"(plan problem: {e.text})")
        else:
            out.append(e.text)
            if e.observation is not None:
                out.append(f"Observation: {clip(e.observation)}")
    return "\n".join(out) if out else "(the plan had no actions)"


def clip(text: str, limit: int = MAX_OBSERVATION_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... ({len(text) - limit} more characters)"


def joiner_system(
    custom: str | None, output_schema: dict[str, Any] | None, can_replan: bool
) -> str:
    parts = [custom or DEFAULT_JOINER, JOINER_FORMAT]
    if output_schema is not None:
        parts.append(
            "The answer inside Finish(...) must be a JSON object that matches this schema:\n"
            + json.dumps(output_schema)
        )
    if not can_replan:
        parts.append(
            "You cannot replan any more: answer with Finish(...) using what the observations give."
        )
    return "\n\n".join(parts)


def joiner_user(question: str, rounds: Sequence[str]) -> str:
    if len(rounds) == 1:
        return f"Question: {question}\n\n{rounds[0]}"
    body = "\n\n".join(f"Plan {i}:\n{text}" for i, text in enumerate(rounds, 1))
    return f"Question: {question}\n\n{body}"


# -- the joiner's answer ----------------------------------------------------------------


@dataclass
class JoinDecision:
    action: Literal["finish", "replan"]
    #: the answer (finish) or the reason (replan)
    text: str
    thought: str = ""


_ACTION = re.compile(r"Action\s*:\s*(Finish|Replan)\s*\(", re.I)
_THOUGHT_LINE = re.compile(r"^\s*Thought\s*:\s*(.*)$", re.I | re.M)


def parse_joiner(text: str) -> JoinDecision:
    """Read `Thought: ...` / `Action: Finish(answer)` or `Action: Replan(reason)`.

    The last action in the text counts. An answer without any `Action:` line is taken as
    the final answer itself (a model that simply answers), minus its `Thought:` lines.
    """
    thoughts = _THOUGHT_LINE.findall(text)
    thought = " ".join(t.strip() for t in thoughts)
    matches = list(_ACTION.finditer(text))
    if not matches:
        answer = _THOUGHT_LINE.sub("", text).strip()
        return JoinDecision("finish", answer, thought)
    last = matches[-1]
    rest = text[last.end() :]
    close = rest.rfind(")")
    inner = rest[:close] if close >= 0 else rest
    action: Literal["finish", "replan"] = (
        "finish" if last.group(1).lower() == "finish" else "replan"
    )
    return JoinDecision(action, inner.strip(), thought)
